package drsync.hadoop;

import java.net.InetAddress;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;

import org.apache.hadoop.conf.Configuration;
import org.apache.hadoop.fs.FileStatus;
import org.apache.hadoop.hdfs.server.namenode.AuditLogger;

/**
 * The namenodes' audit events, kept in memory so that tests can ask what a client really did
 * (which operations, on which paths) without a proxy in between. Both namenodes of an HA pair
 * run in this JVM and record into the same list. Configured as {@code dfs.namenode.audit.loggers}.
 */
public final class AuditRecorder implements AuditLogger {
    private static final int KEEP = 200_000;
    private static final List<Map<String, Object>> EVENTS = new ArrayList<>();
    private static long dropped;

    @Override
    public void initialize(Configuration conf) {
    }

    @Override
    public void logAuditEvent(boolean succeeded, String user, InetAddress addr, String cmd, String src,
                              String dst, FileStatus stat) {
        Map<String, Object> e = new java.util.LinkedHashMap<>();
        e.put("ok", succeeded);
        e.put("user", user);
        e.put("cmd", cmd);
        e.put("src", src);
        e.put("dst", dst);
        synchronized (EVENTS) {
            if (EVENTS.size() >= KEEP) {
                EVENTS.subList(0, KEEP / 2).clear();
                dropped += KEEP / 2;
            }
            e.put("seq", dropped + EVENTS.size());
            EVENTS.add(e);
        }
    }

    /** Events numbered {@code since} and later (numbers count from 0 since the cluster started). */
    public static List<Map<String, Object>> since(long since) {
        synchronized (EVENTS) {
            int from = (int) Math.max(0, Math.min(EVENTS.size(), since - dropped));
            return new ArrayList<>(EVENTS.subList(from, EVENTS.size()));
        }
    }

    /** The number the next event will get. */
    public static long next() {
        synchronized (EVENTS) {
            return dropped + EVENTS.size();
        }
    }
}
