package drsync.hadoop;

import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.io.InputStream;
import java.io.OutputStream;
import java.io.PrintStream;
import java.net.InetSocketAddress;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.StandardCopyOption;
import java.security.PrivilegedExceptionAction;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

import com.fasterxml.jackson.databind.ObjectMapper;
import com.sun.net.httpserver.HttpExchange;
import com.sun.net.httpserver.HttpServer;

import org.apache.hadoop.conf.Configuration;
import org.apache.hadoop.hdfs.DFSConfigKeys;
import org.apache.hadoop.hdfs.DistributedFileSystem;
import org.apache.hadoop.hdfs.HdfsConfiguration;
import org.apache.hadoop.hdfs.MiniDFSCluster;
import org.apache.hadoop.hdfs.MiniDFSNNTopology;
import org.apache.hadoop.hdfs.server.namenode.ha.HATestUtil;
import org.apache.hadoop.hdfs.tools.DFSAdmin;
import org.apache.hadoop.hdfs.tools.DFSHAAdmin;
import org.apache.hadoop.security.UserGroupInformation;
import org.apache.hadoop.security.token.Token;
import org.apache.hadoop.tools.DistCp;
import org.apache.hadoop.util.Tool;
import org.apache.hadoop.util.ToolRunner;

/**
 * A real HDFS for drsync's tests and benchmarks: Hadoop's own MiniDFSCluster (namenodes,
 * datanodes, WebHDFS) on free loopback ports, optionally an HA pair of namenodes.
 *
 * <p>Usage: {@code MiniCluster --dir DIR [--ha] [--datanodes N] [--block-size BYTES] [--ls-limit N]}.
 * When the cluster answers it writes {@code DIR/conf/core-site.xml}, {@code DIR/conf/hdfs-site.xml}
 * (a client configuration: the nameservice with an HA pair) and then {@code DIR/cluster.json}. It
 * runs until it is killed (SIGTERM shuts the cluster down).
 *
 * <p>Admin actions come over a loopback HTTP port ({@code control} in cluster.json): POST a JSON list
 * of strings to {@code /run}; the answer is {@code {"rc": int, "out": str, "err": str}}. Actions:
 * {@code dfsadmin ARGS} and {@code haadmin ARGS} (Hadoop's DFSAdmin and DFSHAAdmin),
 * {@code distcp ARGS} (Hadoop's DistCp, MapReduce local runner), {@code namenode stop|restart I},
 * {@code datanode stop|restart I}, {@code state}, {@code audit SINCE} (the namenodes' audit events
 * numbered SINCE and later), {@code token USER} (a delegation token for USER, URL-encoded).
 */
public final class MiniCluster {
    private static final ObjectMapper JSON = new ObjectMapper();
    private static final Object CONSOLE = new Object();

    private final MiniDFSCluster cluster;
    private final Configuration clientConf;
    private final boolean ha;
    private final Path dir;
    private final Map<Integer, MiniDFSCluster.DataNodeProperties> stoppedDataNodes = new LinkedHashMap<>();
    private final List<String> webAddresses = new ArrayList<>();
    private final List<String> rpcAddresses = new ArrayList<>();

    private MiniCluster(MiniDFSCluster cluster, Configuration clientConf, boolean ha, Path dir) {
        this.cluster = cluster;
        this.clientConf = clientConf;
        this.ha = ha;
        this.dir = dir;
        for (int i = 0; i < namenodeCount(); i++) {  // kept: a stopped namenode has no address to ask
            webAddresses.add("127.0.0.1:" + cluster.getNameNode(i).getHttpAddress().getPort());
            rpcAddresses.add("127.0.0.1:" + cluster.getNameNodePort(i));
        }
    }

    public static void main(String[] args) {
        try {
            start(args);
        } catch (Throwable e) {  // a half-started cluster must not linger: exit, the log says why
            e.printStackTrace();
            System.exit(1);
        }
    }

    private static void start(String[] args) throws Exception {
        Path dir = null;
        boolean ha = false;
        int datanodes = 1;
        long blockSize = 1L << 20;
        int lsLimit = 1000;
        for (int i = 0; i < args.length; i++) {
            switch (args[i]) {
                case "--dir" -> dir = Path.of(args[++i]).toAbsolutePath();
                case "--ha" -> ha = true;
                case "--datanodes" -> datanodes = Integer.parseInt(args[++i]);
                case "--block-size" -> blockSize = Long.parseLong(args[++i]);
                case "--ls-limit" -> lsLimit = Integer.parseInt(args[++i]);
                default -> throw new IllegalArgumentException("unknown argument " + args[i]);
            }
        }
        if (dir == null) {
            throw new IllegalArgumentException("--dir DIR is required");
        }
        Files.createDirectories(dir);

        Configuration conf = new HdfsConfiguration();
        conf.setLong(DFSConfigKeys.DFS_BLOCK_SIZE_KEY, blockSize);
        conf.setLong(DFSConfigKeys.DFS_NAMENODE_MIN_BLOCK_SIZE_KEY, Math.min(blockSize, 1L << 20));
        conf.setInt(DFSConfigKeys.DFS_REPLICATION_KEY, Math.min(3, datanodes));
        conf.setInt(DFSConfigKeys.DFS_LIST_LIMIT, lsLimit);
        conf.set(DFSConfigKeys.DFS_NAMENODE_AUDIT_LOGGERS_KEY, AuditRecorder.class.getName());
        // Delegation tokens without Kerberos (Hadoop's switch for tests), so that token auth is real.
        conf.setBoolean(DFSConfigKeys.DFS_NAMENODE_DELEGATION_TOKEN_ALWAYS_USE_KEY, true);
        conf.set("dfs.ha.fencing.methods", "shell(/bin/true)");
        // Checksums that compare across block sizes (what DistCp's verification relies on).
        conf.set("dfs.checksum.combine.mode", "COMPOSITE_CRC");
        conf.setBoolean(DFSConfigKeys.DFS_NAMENODE_ACLS_ENABLED_KEY, true);
        conf.setBoolean(DFSConfigKeys.DFS_NAMENODE_XATTRS_ENABLED_KEY, true);
        conf.set("hadoop.tmp.dir", dir.resolve("tmp").toString());
        conf.set("mapreduce.framework.name", "local");
        conf.set("mapreduce.jobtracker.staging.root.dir", dir.resolve("staging").toString());
        // A client closing a file asks the namenode to complete it; the first ask usually comes before
        // the datanode's report of the block, and the client then sleeps 400 ms (Hadoop's default) before
        // asking again: every file written, by DistCp or over WebHDFS (the datanode's own client), took
        // 0.42 s. Here it asks again after 10 ms, doubling up to 11 times (20 s in all, as the default
        // 400 ms and 5 retries allow 12 s): the same patience on a busy machine, without the fixed wait.
        conf.setInt("dfs.client.block.write.locateFollowingBlock.initial.delay.ms", 10);
        conf.setInt("dfs.client.block.write.locateFollowingBlock.retries", 11);

        // A restarted namenode of the pair names its nameservice in its redirects: the datanodes
        // (which share this configuration) must be able to resolve it.
        conf.set("dfs.client.failover.proxy.provider.minidfs-ns",
            "org.apache.hadoop.hdfs.server.namenode.ha.ConfiguredFailoverProxyProvider");
        MiniDFSCluster.Builder b = new MiniDFSCluster.Builder(conf, dir.resolve("hdfs").toFile())
            .numDataNodes(datanodes).checkExitOnShutdown(false);
        if (ha) {
            b.nnTopology(MiniDFSNNTopology.simpleHATopology(2));
        }
        MiniDFSCluster cluster = b.build();
        Configuration client = new Configuration(conf);
        if (ha) {
            cluster.transitionToActive(0);
            HATestUtil.setFailoverConfigurations(cluster, client, "drsync-ns");
            client.set("fs.defaultFS", "hdfs://drsync-ns");
        } else {
            client.set("fs.defaultFS", "hdfs://127.0.0.1:" + cluster.getNameNodePort(0));
        }
        cluster.waitActive();
        DistributedFileSystem fs = (DistributedFileSystem) org.apache.hadoop.fs.FileSystem.get(client);
        fs.setPermission(new org.apache.hadoop.fs.Path("/"), new org.apache.hadoop.fs.permission.FsPermission((short) 0777));
        fs.mkdirs(new org.apache.hadoop.fs.Path("/tmp"));
        fs.setPermission(new org.apache.hadoop.fs.Path("/tmp"), new org.apache.hadoop.fs.permission.FsPermission((short) 01777));

        MiniCluster mc = new MiniCluster(cluster, client, ha, dir);
        Runtime.getRuntime().addShutdownHook(new Thread(cluster::shutdown));
        HttpServer control = HttpServer.create(new InetSocketAddress("127.0.0.1", 0), 0);
        control.createContext("/run", mc::serve);
        control.setExecutor(java.util.concurrent.Executors.newFixedThreadPool(4));
        control.start();
        mc.writeDescription(control.getAddress().getPort());
        System.err.println("drsync mini cluster ready: " + dir.resolve("cluster.json"));
    }

    private int namenodeCount() {
        return ha ? 2 : 1;
    }

    private String webhdfs(int i) {
        return webAddresses.get(i);
    }

    private String stateOf(int i) {
        if (cluster.getNameNode(i) == null) {
            return "down";
        }
        if (!ha) {
            return "active";
        }
        return cluster.getNameNode(i).getState().toLowerCase();
    }

    private Map<String, Object> state() {
        List<String> web = new ArrayList<>();
        List<Map<String, Object>> nns = new ArrayList<>();
        for (int i = 0; i < namenodeCount(); i++) {
            Map<String, Object> nn = new LinkedHashMap<>();
            nn.put("index", i);
            nn.put("id", ha ? "nn" + (i + 1) : "nn1");
            nn.put("state", stateOf(i));
            nn.put("webhdfs", webhdfs(i));
            nn.put("rpc", rpcAddresses.get(i));
            nns.add(nn);
        }
        for (Map<String, Object> nn : nns) {
            if ("active".equals(nn.get("state"))) {
                web.add((String) nn.get("webhdfs"));
            }
        }
        for (Map<String, Object> nn : nns) {
            if (!"active".equals(nn.get("state"))) {
                web.add((String) nn.get("webhdfs"));
            }
        }
        Map<String, Object> out = new LinkedHashMap<>();
        out.put("webhdfs", web);
        out.put("namenodes", nns);
        out.put("datanodes", cluster.getDataNodes().size());
        return out;
    }

    private void writeDescription(int controlPort) throws IOException {
        Path confDir = dir.resolve("conf");
        Files.createDirectories(confDir);
        // Clients (DistCp jobs in the MapReduce local runner) poll their job every 50 ms, not every
        // 1 s (progress) and 5 s (completion): a job of a second waited up to a second more to end.
        Configuration written = new Configuration(clientConf);
        written.setInt("mapreduce.client.progressmonitor.pollinterval", 50);
        written.setInt("mapreduce.client.completion.pollinterval", 50);
        try (OutputStream o = Files.newOutputStream(confDir.resolve("core-site.xml"))) {
            written.writeXml(o);
        }
        Files.copy(confDir.resolve("core-site.xml"), confDir.resolve("hdfs-site.xml"),
            StandardCopyOption.REPLACE_EXISTING);
        Map<String, Object> desc = state();
        desc.put("hdfs", clientConf.get("fs.defaultFS"));
        desc.put("pid", ProcessHandle.current().pid());
        desc.put("control", "http://127.0.0.1:" + controlPort);
        desc.put("conf_dir", confDir.toString());
        desc.put("superuser", UserGroupInformation.getCurrentUser().getShortUserName());
        desc.put("hadoop_version", org.apache.hadoop.util.VersionInfo.getVersion());
        Path tmp = dir.resolve("cluster.json.tmp");
        JSON.writerWithDefaultPrettyPrinter().writeValue(tmp.toFile(), desc);
        Files.move(tmp, dir.resolve("cluster.json"), StandardCopyOption.ATOMIC_MOVE);
    }

    private void serve(HttpExchange ex) throws IOException {
        Map<String, Object> answer = new LinkedHashMap<>();
        try (InputStream in = ex.getRequestBody()) {
            String[] args = JSON.readValue(in, String[].class);
            answer = run(args);
        } catch (Exception e) {  // one line: a RemoteException's message carries the server's stack
            String m = e instanceof org.apache.hadoop.ipc.RemoteException r
                ? r.getClassName().replaceAll(".*\\.", "") + ": " + r.getMessage() : e.toString();
            answer.put("rc", 1);
            answer.put("out", "");
            answer.put("err", m.split("\n", 2)[0].trim());
        }
        byte[] body = JSON.writeValueAsBytes(answer);
        ex.getResponseHeaders().set("Content-Type", "application/json");
        ex.sendResponseHeaders(200, body.length);
        try (OutputStream o = ex.getResponseBody()) {
            o.write(body);
        }
    }

    private Map<String, Object> run(String[] args) throws Exception {
        if (args.length == 0) {
            throw new IllegalArgumentException("no action");
        }
        String[] rest = java.util.Arrays.copyOfRange(args, 1, args.length);
        Map<String, Object> out = new LinkedHashMap<>();
        switch (args[0]) {
            case "dfsadmin" -> { return tool(() -> new DFSAdmin(new Configuration(clientConf)), rest); }
            case "haadmin" -> {
                return tool(() -> {
                    DFSHAAdmin admin = new DFSHAAdmin();
                    admin.setConf(new Configuration(clientConf));
                    return admin;
                }, rest);
            }
            case "distcp" -> { return tool(() -> newDistCp(), rest); }
            case "namenode" -> namenode(rest[0], Integer.parseInt(rest[1]));
            case "datanode" -> datanode(rest[0], Integer.parseInt(rest[1]));
            case "state" -> { }
            case "tree" -> {
                out.put("rc", 0);
                out.put("entries", tree(rest[0]));
                return out;
            }
            case "copy" -> copy(rest[0], rest[1]);
            case "snapshots" -> {
                out.put("rc", 0);
                out.put("names", snapshots(rest[0]));
                return out;
            }
            case "audit" -> {
                out.put("rc", 0);
                out.put("next", AuditRecorder.next());
                out.put("events", AuditRecorder.since(rest.length > 0 ? Long.parseLong(rest[0]) : 0));
                return out;
            }
            case "token" -> {
                out.put("rc", 0);
                out.put("token", token(rest[0]));
                return out;
            }
            default -> throw new IllegalArgumentException("unknown action " + args[0]);
        }
        out.put("rc", 0);
        out.put("out", JSON.writeValueAsString(state()));
        out.put("err", "");
        return out;
    }

    private org.apache.hadoop.fs.FileSystem superFs() throws IOException {
        return org.apache.hadoop.fs.FileSystem.get(clientConf);
    }

    /** Every entry below {@code root} as Hadoop's own client sees it, files with a SHA-256 of their bytes. */
    private List<Map<String, Object>> tree(String root) throws Exception {
        org.apache.hadoop.fs.FileSystem fs = superFs();
        List<Map<String, Object>> out = new ArrayList<>();
        java.util.ArrayDeque<org.apache.hadoop.fs.Path> todo = new java.util.ArrayDeque<>();
        org.apache.hadoop.fs.Path top = new org.apache.hadoop.fs.Path(root);
        todo.add(top);
        int cut = top.toUri().getPath().length() + 1;
        while (!todo.isEmpty()) {
            for (org.apache.hadoop.fs.FileStatus st : fs.listStatus(todo.poll())) {
                Map<String, Object> e = new LinkedHashMap<>();
                e.put("path", st.getPath().toUri().getPath().substring(cut));
                e.put("type", st.isDirectory() ? "dir" : st.isSymlink() ? "link" : "file");
                e.put("mode", (int) st.getPermission().toShort() & 07777);
                e.put("mtime_ms", st.getModificationTime());
                e.put("owner", st.getOwner());
                if (st.isDirectory()) {
                    todo.add(st.getPath());
                } else if (st.isFile()) {
                    e.put("length", st.getLen());
                    java.security.MessageDigest md = java.security.MessageDigest.getInstance("SHA-256");
                    try (InputStream in = fs.open(st.getPath())) {
                        byte[] buf = new byte[1 << 16];
                        for (int n; (n = in.read(buf)) > 0; ) {
                            md.update(buf, 0, n);
                        }
                    }
                    e.put("sha256", java.util.HexFormat.of().formatHex(md.digest()));
                }
                out.add(e);
            }
        }
        return out;
    }

    /** {@code hdfs dfs -cp -p}: the tree under new inode ids, permissions and times kept. */
    private void copy(String src, String dst) throws IOException {
        org.apache.hadoop.fs.FileSystem fs = superFs();
        copyOne(fs, fs.getFileStatus(new org.apache.hadoop.fs.Path(src)), new org.apache.hadoop.fs.Path(dst));
    }

    private void copyOne(org.apache.hadoop.fs.FileSystem fs, org.apache.hadoop.fs.FileStatus st,
                         org.apache.hadoop.fs.Path dst) throws IOException {
        if (st.isDirectory()) {
            fs.mkdirs(dst);
            for (org.apache.hadoop.fs.FileStatus child : fs.listStatus(st.getPath())) {
                copyOne(fs, child, new org.apache.hadoop.fs.Path(dst, child.getPath().getName()));
            }
        } else {
            org.apache.hadoop.fs.FileUtil.copy(fs, st.getPath(), fs, dst, false, true, clientConf);
        }
        fs.setPermission(dst, st.getPermission());
        fs.setOwner(dst, st.getOwner(), st.getGroup());
        fs.setTimes(dst, st.getModificationTime(), -1);
    }

    private List<String> snapshots(String dir) throws IOException {
        List<String> names = new ArrayList<>();
        for (org.apache.hadoop.fs.FileStatus st : superFs().listStatus(new org.apache.hadoop.fs.Path(dir, ".snapshot"))) {
            names.add(st.getPath().getName());
        }
        return names;
    }

    private void checkIndex(String what, int i, int count) {
        if (i < 0 || i >= count) {
            throw new IllegalArgumentException(what + " " + i + " does not exist (this cluster has " + count + ")");
        }
    }

    private void namenode(String what, int i) throws IOException {
        checkIndex("namenode", i, namenodeCount());
        switch (what) {
            case "stop" -> cluster.shutdownNameNode(i);
            case "restart" -> cluster.restartNameNode(i, true);
            default -> throw new IllegalArgumentException("namenode stop|restart I");
        }
    }

    private void datanode(String what, int i) throws IOException {
        checkIndex("datanode", i, Math.max(cluster.getDataNodes().size(), stoppedDataNodes.isEmpty() ? 0
            : java.util.Collections.max(stoppedDataNodes.keySet()) + 1));
        switch (what) {
            case "stop" -> stoppedDataNodes.put(i, cluster.stopDataNode(i));
            case "restart" -> {
                MiniDFSCluster.DataNodeProperties p = stoppedDataNodes.remove(i);
                if (p != null) {
                    cluster.restartDataNode(p, true);
                } else {
                    cluster.restartDataNode(i, true);
                }
                cluster.waitActive();
            }
            default -> throw new IllegalArgumentException("datanode stop|restart I");
        }
    }

    private String token(String user) throws Exception {
        UserGroupInformation ugi = UserGroupInformation.createRemoteUser(user);
        Token<?> t = ugi.doAs((PrivilegedExceptionAction<Token<?>>) () -> {
            DistributedFileSystem fs = (DistributedFileSystem) org.apache.hadoop.fs.FileSystem.newInstance(clientConf);
            try {
                return fs.getDelegationToken(user);
            } finally {
                fs.close();
            }
        });
        return t.encodeToUrlString();
    }

    private DistCp newDistCp() {
        try {
            return new DistCp(new Configuration(clientConf), null);
        } catch (Exception e) {
            throw new IllegalStateException(e);
        }
    }

    /**
     * Runs a Hadoop tool in this JVM with its console output captured (one tool at a time). The tool
     * is made inside the capture: some keep System.out as it was when they were constructed.
     */
    private static Map<String, Object> tool(java.util.function.Supplier<Tool> make, String[] args) throws Exception {
        synchronized (CONSOLE) {
            PrintStream oldOut = System.out;
            PrintStream oldErr = System.err;
            ByteArrayOutputStream out = new ByteArrayOutputStream();
            ByteArrayOutputStream err = new ByteArrayOutputStream();
            int rc;
            try {
                System.setOut(new PrintStream(out, true, StandardCharsets.UTF_8));
                System.setErr(new PrintStream(err, true, StandardCharsets.UTF_8));
                rc = ToolRunner.run(make.get(), args);
            } finally {
                System.setOut(oldOut);
                System.setErr(oldErr);
            }
            Map<String, Object> m = new LinkedHashMap<>();
            m.put("rc", rc);
            m.put("out", out.toString(StandardCharsets.UTF_8));
            m.put("err", err.toString(StandardCharsets.UTF_8));
            return m;
        }
    }
}
