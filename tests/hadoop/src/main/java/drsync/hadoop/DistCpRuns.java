package drsync.hadoop;

import java.io.File;

import com.fasterxml.jackson.databind.ObjectMapper;

import org.apache.hadoop.conf.Configuration;
import org.apache.hadoop.tools.DistCp;
import org.apache.hadoop.util.ToolRunner;

/**
 * Several DistCp runs in one JVM, for tests with many cases (a JVM per run costs seconds):
 * {@code DistCpRuns FILE}, FILE a JSON list of argument lists, each run as {@code hadoop distcp ARGS}
 * would (the classpath's configuration, a new Configuration per run). On stderr, before each run
 * {@code drsync-distcp-run I}, after it {@code drsync-distcp-rc I RC} (DistCp's return value, -1 for
 * invalid input), Hadoop's log lines between. Exits 0.
 */
public final class DistCpRuns {
    private DistCpRuns() {
    }

    public static void main(String[] args) throws Exception {
        String[][] runs = new ObjectMapper().readValue(new File(args[0]), String[][].class);
        for (int i = 0; i < runs.length; i++) {
            System.err.println("drsync-distcp-run " + i);
            int rc;
            try {
                rc = ToolRunner.run(new DistCp(new Configuration(), null), runs[i]);
            } catch (Exception e) {  // as DistCp.main: UNKNOWN_ERROR
                e.printStackTrace();
                rc = -999;
            }
            System.err.println("drsync-distcp-rc " + i + " " + rc);
        }
        System.exit(0);
    }
}
