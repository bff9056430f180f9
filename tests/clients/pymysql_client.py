#!/usr/bin/python3
"""A real Python client (PyMySQL from Debian) driven by tests/mysql.rs.
Usage: pymysql_client.py PORT USER INFILE; prints name=value lines."""
import sys

import pymysql
from pymysql.constants import CLIENT

port, user, infile = int(sys.argv[1]), sys.argv[2], sys.argv[3]
c = pymysql.connect(host="127.0.0.1", port=port, user=user, database="appdb",
                    local_infile=True, client_flag=CLIENT.MULTI_STATEMENTS)
with c.cursor() as cur:
    cur.execute("select current_user()")
    print("current_user=%s" % cur.fetchone()[0])
    cur.execute("select %s + 1, concat(%s, 'x')", (41, "ü"))
    print("params=%s,%s" % cur.fetchone())
    cur.execute("select 1; select 2, 3")
    sets = 1
    while cur.nextset():
        sets += 1
    print("result_sets=%d" % sets)
    cur.execute("select seq, md5(seq) from seq_1_to_100000")
    rows = cur.fetchall()
    print("rows=%d,sum=%d" % (len(rows), sum(r[0] for r in rows)))
    cur.execute("create temporary table py_load (line varchar(200))")
    cur.execute("load data local infile %s into table py_load", (infile,))
    cur.execute("select count(*) from py_load")
    print("loaded=%d" % cur.fetchone()[0])
    cur.execute("create table if not exists py_tx_%d (id int) engine=innodb" % port)
    c.begin()
    cur.execute("insert into py_tx_%d values (1)" % port)
    c.rollback()
    c.begin()
    cur.execute("insert into py_tx_%d values (2)" % port)
    c.commit()
    cur.execute("select group_concat(id) from py_tx_%d" % port)
    print("tx=%s" % cur.fetchone()[0])
    cur.execute("drop table py_tx_%d" % port)
c.close()

# The client's character set and connection attributes reach the server.
c = pymysql.connect(host="127.0.0.1", port=port, user=user, database="appdb", charset="latin1",
                    program_name="rip-through-proxy")
with c.cursor() as cur:
    cur.execute("select @@character_set_client, @@collation_connection")
    print("charset=%s,%s" % cur.fetchone())
    cur.execute("select attr_value from performance_schema.session_connect_attrs"
                " where processlist_id = connection_id() and attr_name = 'program_name'")
    print("program_name=%s" % cur.fetchone()[0])
c.close()
