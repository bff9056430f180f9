// A real JDBC client (MariaDB Connector/J from Debian) driven by tests/mysql.rs.
// Usage: java -cp mariadb-java-client.jar:. MysqlClient PORT USER INFILE
// Prints one "name=value" line per check; the Rust test asserts them.
import java.sql.*;

public class MysqlClient {
    public static void main(String[] args) throws Exception {
        String port = args[0], user = args[1], infile = args[2];
        String url = "jdbc:mariadb://127.0.0.1:" + port + "/appdb?user=" + user
            + "&useSsl=false&allowMultiQueries=true&allowLocalInfile=true&useServerPrepStmts=true";
        try (Connection c = DriverManager.getConnection(url)) {
            try (Statement s = c.createStatement(); ResultSet r = s.executeQuery("select current_user()")) {
                r.next();
                System.out.println("current_user=" + r.getString(1));
            }
            try (PreparedStatement p = c.prepareStatement("select ? + 1, concat(?, 'x')")) {
                p.setInt(1, 41);
                p.setString(2, "ü");
                try (ResultSet r = p.executeQuery()) {
                    r.next();
                    System.out.println("prepared=" + r.getInt(1) + "," + r.getString(2));
                }
            }
            try (Statement s = c.createStatement()) {
                boolean rs = s.execute("select 1; select 2, 3");
                int sets = 0;
                while (true) {
                    if (rs) { try (ResultSet r = s.getResultSet()) { while (r.next()) {} } sets++; }
                    else if (s.getUpdateCount() == -1) break;
                    rs = s.getMoreResults();
                }
                System.out.println("result_sets=" + sets);
            }
            try (Statement s = c.createStatement(); ResultSet r = s.executeQuery("select seq, md5(seq) from seq_1_to_100000")) {
                long n = 0, sum = 0;
                while (r.next()) { n++; sum += r.getLong(1); }
                System.out.println("rows=" + n + ",sum=" + sum);
            }
            String table = "jdbc_" + ProcessHandle.current().pid();
            try (Statement s = c.createStatement()) {
                s.execute("create temporary table " + table + " (line varchar(200))");
                int loaded = s.executeUpdate("load data local infile '" + infile + "' into table " + table);
                System.out.println("loaded=" + loaded);
                c.setAutoCommit(false);
                s.execute("create table if not exists " + table + "_tx (id int) engine=innodb");
                s.execute("insert into " + table + "_tx values (1)");
                c.rollback();
                s.execute("insert into " + table + "_tx values (2)");
                c.commit();
                c.setAutoCommit(true);
                try (ResultSet r = s.executeQuery("select group_concat(id) from " + table + "_tx")) {
                    r.next();
                    System.out.println("tx=" + r.getString(1));
                }
                s.execute("drop table " + table + "_tx");
            }
        }
    }
}
