package drsync.distcp;

import java.io.ByteArrayOutputStream;
import java.io.FileNotFoundException;
import java.io.IOException;
import java.io.InputStream;
import java.lang.reflect.Constructor;
import java.nio.ByteBuffer;
import java.nio.charset.CharacterCodingException;
import java.nio.charset.CodingErrorAction;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.LinkedList;
import java.util.List;
import java.util.Map;

import org.apache.hadoop.conf.Configuration;
import org.apache.hadoop.fs.FileStatus;
import org.apache.hadoop.fs.FileSystem;
import org.apache.hadoop.fs.Path;
import org.apache.hadoop.io.IOUtils;
import org.apache.hadoop.io.SequenceFile;
import org.apache.hadoop.io.Text;
import org.apache.hadoop.mapreduce.security.TokenCache;
import org.apache.hadoop.security.Credentials;
import org.apache.hadoop.tools.CopyListing;
import org.apache.hadoop.tools.CopyListingFileStatus;
import org.apache.hadoop.tools.DistCpConstants;
import org.apache.hadoop.tools.DistCpContext;
import org.apache.hadoop.tools.util.DistCpUtils;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * A DistCp copy listing that copies each listed file of one source directory (a snapshot root) to
 * a name drsync chooses below the target directory, where stock DistCp keeps each file's relative
 * path (one source) or only its basename (several file sources).
 *
 * <p>Use: {@code hadoop distcp -Ddistcp.copy.listing.class=drsync.distcp.ListedCopyListing
 * -Ddrsync.distcp.listing=LISTING SOURCE_ROOT TARGET_DIR}, with this jar on {@code HADOOP_CLASSPATH}
 * (only the DistCp client loads this class; the map tasks run DistCp's own CopyMapper).
 *
 * <p>LISTING ({@value #LISTING_KEY}) is a local path, or a Hadoop path with a scheme ({@code file:///...},
 * {@code hdfs://...}; as Hadoop writes paths, not percent-encoded), of a UTF-8 text file with one line per file, {@code SOURCE<TAB>TARGET}, both
 * percent-encoded UTF-8 ({@code urllib.parse.quote(name, safe="")}: '+' is a plus, never a space).
 * SOURCE is relative to SOURCE_ROOT, TARGET relative to TARGET_DIR; neither may be absolute or have
 * an empty, "." or ".." component. SOURCE must be a file, TARGETs must differ and none may be the
 * parent directory of another. Every file is checked before anything is copied: a refused listing
 * makes DistCp exit with its INVALID_ARGUMENT code (-1, exit status 255) and log
 * {@code Invalid input: ... drsync.distcp.listing ...} with the reason; nothing is written below
 * TARGET_DIR.
 *
 * <p>The copy list DistCp gets has one entry per line: key {@code "/" + TARGET} (DistCp's CopyMapper
 * copies to TARGET_DIR + key), value the source file's {@link CopyListingFileStatus} (split in
 * chunks with {@code -blocksperchunk}, as DistCp's own listings do).
 */
public class ListedCopyListing extends CopyListing {
    /** The configuration key naming the listing file. */
    public static final String LISTING_KEY = "drsync.distcp.listing";
    private static final Logger LOG = LoggerFactory.getLogger(ListedCopyListing.class);

    private long bytesToCopy;
    private long numberOfPaths;
    private Path sourceRoot;
    private List<Entry> entries;

    /** One line of the listing, decoded. */
    private record Entry(int line, String source, String target) { }

    public ListedCopyListing(Configuration configuration, Credentials credentials) {
        super(configuration, credentials);
    }

    @Override
    protected void validatePaths(DistCpContext context) throws IOException {
        Configuration conf = getConf();
        if (context.getSourceFileListing() != null) {
            throw refused("give one source directory (the snapshot root), not -f: the files come from "
                + LISTING_KEY);
        }
        List<Path> sources = context.getSourcePaths();
        if (sources == null || sources.size() != 1) {
            throw refused("give exactly one source path (the snapshot root the listing is relative to), not "
                + (sources == null ? 0 : sources.size()) + ": " + sources);
        }
        Path root = sources.get(0);
        FileSystem sourceFs = root.getFileSystem(conf);
        FileStatus rootStatus;
        try {
            rootStatus = sourceFs.getFileStatus(root);
        } catch (FileNotFoundException e) {
            throw refused("the source root " + root + " does not exist");
        }
        if (!rootStatus.isDirectory()) {
            throw refused("the source root " + root + " is not a directory");
        }
        sourceRoot = rootStatus.getPath();

        Path target = context.getTargetPath();
        FileSystem targetFs = target.getFileSystem(conf);
        boolean targetExists = false;
        try {
            if (!targetFs.getFileStatus(target).isDirectory()) {
                throw refused("the target " + target + " is a file: give a directory");
            }
            targetExists = true;
        } catch (FileNotFoundException ignored) {
            // created by the copy
        }
        if (context.shouldAtomicCommit() && targetExists) {
            throw refused("the target " + target + " exists: -atomic needs a target that does not");
        }
        // /.reserved/raw (encryption zones' raw bytes) on both sides or neither, as DistCp's own listing.
        String raw = DistCpConstants.HDFS_RESERVED_RAW_DIRECTORY_NAME;
        boolean rawSource = Path.getPathWithoutSchemeAndAuthority(sourceRoot).toString().startsWith(raw);
        boolean rawTarget = Path.getPathWithoutSchemeAndAuthority(targetFs.makeQualified(target)).toString()
            .startsWith(raw);
        if (rawSource != rawTarget) {
            throw refused("the source root " + root + " and the target " + target + " must both be below " + raw
                + " or neither");
        }
        if (rawTarget) {
            context.setPreserveRawXattrs(true);
            conf.setBoolean(DistCpConstants.CONF_LABEL_PRESERVE_RAWXATTRS, true);
        }

        entries = readListing(conf);

        Credentials credentials = getCredentials();  // the map tasks read the source cluster
        if (credentials != null) {
            TokenCache.obtainTokensForNamenodes(credentials, new Path[] {sourceRoot}, conf);
        }
    }

    @Override
    protected void doBuildListing(Path pathToListFile, DistCpContext context) throws IOException {
        Configuration conf = getConf();
        FileSystem sourceFs = sourceRoot.getFileSystem(conf);
        // Every source is looked at before the copy list is written: a refusal copies nothing.
        List<FileStatus> statuses = new ArrayList<>(entries.size());
        for (Entry e : entries) {
            Path source = child(sourceRoot, e.source());
            FileStatus st;
            try {
                st = sourceFs.getFileStatus(source);
            } catch (FileNotFoundException ex) {
                throw refused("line " + e.line() + ": SOURCE " + quoted(e.source()) + " does not exist in "
                    + sourceRoot);
            }
            if (st.isDirectory()) {
                throw refused("line " + e.line() + ": SOURCE " + quoted(e.source()) + " is a directory in "
                    + sourceRoot + ": list files only");
            }
            if (!st.isFile()) {
                throw refused("line " + e.line() + ": SOURCE " + quoted(e.source()) + " is not a file in "
                    + sourceRoot);
            }
            statuses.add(st);
        }

        FileSystem listFs = pathToListFile.getFileSystem(conf);
        listFs.delete(pathToListFile, false);
        SequenceFile.Writer writer = SequenceFile.createWriter(conf,
            SequenceFile.Writer.file(pathToListFile),
            SequenceFile.Writer.keyClass(Text.class),
            SequenceFile.Writer.valueClass(CopyListingFileStatus.class),
            SequenceFile.Writer.compression(SequenceFile.CompressionType.NONE));
        try {
            for (int i = 0; i < entries.size(); i++) {
                // File entries: ACLs and xattrs are read by the map task when it copies (as DistCp's own listing).
                LinkedList<CopyListingFileStatus> parts = DistCpUtils.toCopyListingFileStatus(sourceFs,
                    statuses.get(i), false, false, false, context.getBlocksPerChunk());
                Text key = new Text("/" + entries.get(i).target());
                for (CopyListingFileStatus part : parts) {
                    writer.append(key, part);
                    writer.sync();  // the input formats split the copy list at sync marks
                    bytesToCopy += part.getSizeToCopy();
                    numberOfPaths++;
                }
            }
            writer.close();
            writer = null;
        } finally {
            IOUtils.cleanupWithLogger(LOG, writer);
        }
        LOG.info("drsync listing: {} files, {} bytes from {}", entries.size(), bytesToCopy, sourceRoot);
    }

    @Override
    protected long getBytesToCopy() {
        return bytesToCopy;
    }

    @Override
    protected long getNumberOfPaths() {
        return numberOfPaths;
    }

    // --- the listing file ---------------------------------------------------------------------

    private List<Entry> readListing(Configuration conf) throws IOException {
        String where = conf.getTrimmed(LISTING_KEY, "");
        if (where.isEmpty()) {
            throw refused("set " + LISTING_KEY + " to the listing file (lines SOURCE<TAB>TARGET, percent-encoded)");
        }
        Path listing = listingPath(where);
        byte[] bytes;
        try (InputStream in = listing.getFileSystem(conf).open(listing)) {
            ByteArrayOutputStream out = new ByteArrayOutputStream();
            in.transferTo(out);
            bytes = out.toByteArray();
        } catch (FileNotFoundException e) {
            throw refused("the listing file " + listing + " does not exist");
        }
        String text;
        try {
            text = utf8(bytes);
        } catch (CharacterCodingException e) {
            throw refused("the listing file " + listing + " is not UTF-8");
        }
        List<String> lines = new ArrayList<>(List.of(text.split("\n", -1)));
        if (lines.get(lines.size() - 1).isEmpty()) {
            lines.remove(lines.size() - 1);  // the newline that ends the last line
        }
        if (lines.isEmpty()) {
            throw refused("the listing file " + listing + " lists no file");
        }
        List<Entry> out = new ArrayList<>(lines.size());
        Map<String, Integer> targets = new HashMap<>();
        for (int i = 0; i < lines.size(); i++) {
            int n = i + 1;
            String line = lines.get(i);
            String[] fields = line.split("\t", -1);
            if (fields.length != 2) {
                throw refused("line " + n + " of " + listing + " is not SOURCE<TAB>TARGET (" + fields.length
                    + " tab-separated fields): " + quoted(line));
            }
            String source = decode(fields[0], n, "SOURCE", listing);
            String target = decode(fields[1], n, "TARGET", listing);
            checkRelative(source, n, "SOURCE", listing);
            checkRelative(target, n, "TARGET", listing);
            Integer before = targets.putIfAbsent(target, n);
            if (before != null) {
                throw refused("lines " + before + " and " + n + " of " + listing + " both have TARGET "
                    + quoted(target));
            }
            out.add(new Entry(n, source, target));
        }
        for (Entry e : out) {  // a TARGET that another one needs as its directory
            String t = e.target();
            for (int slash = t.indexOf('/'); slash > 0; slash = t.indexOf('/', slash + 1)) {
                Integer parent = targets.get(t.substring(0, slash));
                if (parent != null) {
                    throw refused("line " + parent + " of " + listing + " has TARGET " + quoted(t.substring(0, slash))
                        + ", the directory of TARGET " + quoted(t) + " on line " + e.line());
                }
            }
        }
        return out;
    }

    /** A value without a scheme is a local file (relative to the working directory), else a Hadoop URI. */
    private static Path listingPath(String where) {
        if (where.matches("^[A-Za-z][A-Za-z0-9+.-]*:.*")) {
            return new Path(where);
        }
        return new Path(new java.io.File(where).getAbsoluteFile().toURI());
    }

    /** Percent-decoding to UTF-8; unlike URLDecoder, '+' stays a plus. */
    private String decode(String field, int line, String what, Path listing) {
        ByteArrayOutputStream out = new ByteArrayOutputStream(field.length());
        for (int i = 0; i < field.length(); i++) {
            char c = field.charAt(i);
            if (c == '%') {
                int hi = i + 2 < field.length() ? Character.digit(field.charAt(i + 1), 16) : -1;
                int lo = hi >= 0 ? Character.digit(field.charAt(i + 2), 16) : -1;
                if (hi < 0 || lo < 0) {
                    throw refused("line " + line + " of " + listing + ": " + what + " " + quoted(field)
                        + " has a '%' that is not followed by two hex digits");
                }
                out.write(hi << 4 | lo);
                i += 2;
            } else if (c < 0x20 || c == 0x7f) {
                throw refused("line " + line + " of " + listing + ": " + what + " " + quoted(field)
                    + " has a control character: percent-encode it");
            } else {
                byte[] b = String.valueOf(c).getBytes(StandardCharsets.UTF_8);
                if (Character.isHighSurrogate(c) && i + 1 < field.length()) {
                    b = field.substring(i, i + 2).getBytes(StandardCharsets.UTF_8);
                    i++;
                }
                out.write(b, 0, b.length);
            }
        }
        try {
            return utf8(out.toByteArray());
        } catch (CharacterCodingException e) {
            throw refused("line " + line + " of " + listing + ": " + what + " " + quoted(field)
                + " does not decode to UTF-8");
        }
    }

    private void checkRelative(String name, int line, String what, Path listing) {
        String why = null;
        if (name.isEmpty()) {
            why = "is empty";
        } else if (name.startsWith("/")) {
            why = "is absolute: give it relative to the " + (what.equals("SOURCE") ? "source root" : "target");
        } else if (name.indexOf('\0') >= 0) {
            why = "has a NUL character";
        } else {
            for (String part : name.split("/", -1)) {
                if (part.equals("..")) {
                    why = "has a '..' component";
                    break;
                }
                if (part.isEmpty() || part.equals(".")) {
                    why = "has an empty or '.' component";
                    break;
                }
            }
        }
        if (why != null) {
            throw refused("line " + line + " of " + listing + ": " + what + " " + quoted(name) + " " + why);
        }
    }

    // --- helpers --------------------------------------------------------------------------------

    private static String utf8(byte[] bytes) throws CharacterCodingException {
        return StandardCharsets.UTF_8.newDecoder().onMalformedInput(CodingErrorAction.REPORT)
            .onUnmappableCharacter(CodingErrorAction.REPORT).decode(ByteBuffer.wrap(bytes)).toString();
    }

    /** {@code root}/{@code relative}, built from URI parts: a ':' in a name is not taken for a scheme. */
    private static Path child(Path root, String relative) {
        java.net.URI u = root.toUri();
        String base = u.getPath().endsWith("/") ? u.getPath() : u.getPath() + "/";
        return new Path(u.getScheme(), u.getAuthority(), base + relative);
    }

    /** A name as Java would write it in a string literal, so that tabs and newlines show. */
    private static String quoted(String s) {
        StringBuilder b = new StringBuilder("\"");
        for (int i = 0; i < s.length(); i++) {
            char c = s.charAt(i);
            switch (c) {
                case '\t' -> b.append("\\t");
                case '\n' -> b.append("\\n");
                case '\r' -> b.append("\\r");
                case '"' -> b.append("\\\"");
                case '\\' -> b.append("\\\\");
                default -> {
                    if (c < 0x20 || c == 0x7f) {
                        b.append(String.format("\\u%04x", (int) c));
                    } else {
                        b.append(c);
                    }
                }
            }
        }
        return b.append('"').toString();
    }

    private static final Constructor<? extends RuntimeException> INVALID_INPUT = invalidInput();

    /**
     * DistCp's own CopyListing.InvalidInputException (package-private), so that DistCp logs
     * "Invalid input" and exits with INVALID_ARGUMENT (-1) as for its own listings' refusals; an
     * IllegalArgumentException (exit -999, UNKNOWN_ERROR) if a later DistCp has no such class.
     */
    @SuppressWarnings("unchecked")
    private static Constructor<? extends RuntimeException> invalidInput() {
        try {
            Class<?> c = Class.forName("org.apache.hadoop.tools.CopyListing$InvalidInputException");
            Constructor<?> k = c.getDeclaredConstructor(String.class);
            k.setAccessible(true);
            return (Constructor<? extends RuntimeException>) k;
        } catch (ReflectiveOperationException | RuntimeException e) {
            return null;
        }
    }

    private static RuntimeException refused(String why) {
        String message = "drsync listing (" + LISTING_KEY + "): " + why;
        if (INVALID_INPUT != null) {
            try {
                return INVALID_INPUT.newInstance(message);
            } catch (ReflectiveOperationException | RuntimeException ignored) {
                // fall through
            }
        }
        return new IllegalArgumentException(message);
    }
}
