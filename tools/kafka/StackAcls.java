import java.io.BufferedReader;
import java.io.InputStream;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import java.util.Properties;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.common.acl.AccessControlEntry;
import org.apache.kafka.common.acl.AclBinding;
import org.apache.kafka.common.acl.AclBindingFilter;
import org.apache.kafka.common.acl.AclOperation;
import org.apache.kafka.common.acl.AclPermissionType;
import org.apache.kafka.common.resource.PatternType;
import org.apache.kafka.common.resource.ResourcePattern;
import org.apache.kafka.common.resource.ResourceType;

/**
 * Creates the ACLs of scripts/stack.sh's secure mode with the Admin API (the Maven-resolved broker
 * jars hold no kafka-acls tool). Usage: java -cp "LIBS/*" StackAcls.java CLIENT.properties < ACLS
 * where each line of ACLS is: PRINCIPAL OPERATION RESOURCE_TYPE PATTERN_TYPE NAME (allowed from any
 * host). Prints every ACL the cluster holds afterwards.
 */
public class StackAcls {
    public static void main(String[] args) throws Exception {
        Properties config = new Properties();
        try (InputStream in = Files.newInputStream(Path.of(args[0]))) {
            config.load(in);
        }
        List<AclBinding> acls = new ArrayList<>();
        BufferedReader lines = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        for (String line = lines.readLine(); line != null; line = lines.readLine()) {
            line = line.strip();
            if (line.isEmpty() || line.startsWith("#")) {
                continue;
            }
            String[] f = line.split("\\s+");
            if (f.length != 5) {
                throw new IllegalArgumentException("want PRINCIPAL OPERATION RESOURCE_TYPE PATTERN_TYPE NAME: " + line);
            }
            AclOperation operation = AclOperation.fromString(f[1]);
            ResourceType type = ResourceType.fromString(f[2]);
            PatternType pattern = PatternType.fromString(f[3]);
            if (operation == AclOperation.UNKNOWN || type == ResourceType.UNKNOWN || pattern == PatternType.UNKNOWN) {
                throw new IllegalArgumentException("unknown operation, resource or pattern type: " + line);
            }
            acls.add(new AclBinding(
                new ResourcePattern(type, f[4], pattern),
                new AccessControlEntry(f[0], "*", operation, AclPermissionType.ALLOW)));
        }
        try (Admin admin = Admin.create(config)) {
            admin.createAcls(acls).all().get();
            for (AclBinding acl : admin.describeAcls(AclBindingFilter.ANY).values().get()) {
                System.out.println(acl);
            }
        }
    }
}
