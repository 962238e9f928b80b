#include <doctest/doctest.h>

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <fstream>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "paasmilter/ip.hpp"
#include "paasmilter/prefix_trie.hpp"
#include "paasmilter/regex.hpp"
#include "paasmilter/table.hpp"

using namespace paasmilter;
namespace fs = std::filesystem;

namespace {

const std::string kDataDir = std::string(PAAS_TEST_DATA_DIR) + "/tables";

// A private directory for generated fixtures, removed afterwards.
class TempDir {
  public:
    TempDir() {
        std::string pattern = (fs::temp_directory_path() / "paas-tables-XXXXXX").string();
        REQUIRE(::mkdtemp(pattern.data()) != nullptr);
        path_ = pattern;
    }
    ~TempDir() {
        std::error_code ignored;
        fs::remove_all(path_, ignored);
    }
    TempDir(const TempDir&) = delete;
    TempDir& operator=(const TempDir&) = delete;

    // Writes `content` byte for byte and returns the file's path.
    std::string write(const std::string& name, const std::string& content) const {
        const std::string file = (path_ / name).string();
        std::ofstream out(file, std::ios::binary);
        out << content;
        REQUIRE(out.good());
        return file;
    }
    std::string path() const { return path_.string(); }

  private:
    fs::path path_;
};

std::unique_ptr<Table> open_ok(const std::string& spec, KeyKind kind) {
    auto table = open_table(spec, kind);
    REQUIRE_MESSAGE(table.ok(), (table.ok() ? "" : table.error().to_string()));
    return std::move(table).value();
}

std::string open_error(const std::string& spec, KeyKind kind) {
    auto table = open_table(spec, kind);
    REQUIRE_FALSE_MESSAGE(table.ok(), "expected an error opening ", spec);
    return table.error().to_string();
}

// "value@where" or "-" when nothing matches: one string per lookup keeps checks short.
std::string find(const Table& table, std::string_view key) {
    const auto match = table.lookup(key);
    if (!match) return "-";
    return match->value + "@" + match->where;
}

std::unique_ptr<Table> inline_ok(const std::vector<std::string>& patterns, KeyKind kind) {
    std::vector<InlineEntry> entries;
    int line = 10;
    for (const auto& pattern : patterns) entries.push_back({pattern, "rules.toml", line++});
    auto table = make_inline_table(entries, kind, "rules[0].test");
    REQUIRE_MESSAGE(table.ok(), (table.ok() ? "" : table.error().to_string()));
    return std::move(table).value();
}

std::string inline_error(const std::vector<std::string>& patterns, KeyKind kind) {
    std::vector<InlineEntry> entries;
    int line = 10;
    for (const auto& pattern : patterns) entries.push_back({pattern, "rules.toml", line++});
    auto table = make_inline_table(entries, kind, "rules[0].test");
    REQUIRE_FALSE(table.ok());
    return table.error().to_string();
}

std::vector<std::string> results_of(const Table& table) {
    std::vector<std::string> out;
    table.for_each_result([&](const std::string& value, const std::string& where) {
        out.push_back(value + "@" + where);
    });
    return out;
}

}  // namespace

// ---------------------------------------------------------------------------------------
// cidr:

TEST_CASE("cidr: fixture lookups in file order") {
    const std::string path = kDataDir + "/sample.cidr";
    const auto table = open_ok("cidr:" + path, KeyKind::ip);
    const auto at = [&](int line) { return path + ":" + std::to_string(line); };

    CHECK(table->describe() == "cidr:" + path);
    CHECK(find(*table, "192.0.2.99") == "DUNNO@" + at(2));
    CHECK(find(*table, "192.0.2.1") == "acs-smtp@" + at(3));
    CHECK(find(*table, "198.51.100.127") == "exchange-online@" + at(4));
    CHECK(find(*table, "198.51.100.128") == "-");
    CHECK(find(*table, "2001:db8:10:ffff::1") == "acs-smtp@" + at(5));

    // Narrow before wide: both reachable. Wide before narrow: the narrow one is shadowed.
    CHECK(find(*table, "203.0.113.15") == "narrow@" + at(8));
    CHECK(find(*table, "203.0.113.16") == "wide@" + at(9));
    CHECK(find(*table, "10.1.2.3") == "ten@" + at(11));

    // if 172.16.0.0/12 { !172.16.5.0/24 ...; 172.16.0.0/12 ... }
    CHECK(find(*table, "172.16.1.1") == "outside-lab@" + at(16));
    CHECK(find(*table, "172.16.5.9") == "lab@" + at(17));
    CHECK(find(*table, "172.32.0.1") == "-");

    // if !2001:db8::/32 { ::/0 other-ipv6 }; the IPv4 clients above never enter it.
    CHECK(find(*table, "2001:db9::1") == "other-ipv6@" + at(20));
    CHECK(find(*table, "2001:db8::1") == "-");
    CHECK(find(*table, "192.0.2.300") == "-");
    CHECK(find(*table, "8.8.8.8") == "-");

    // Continuation line: the entry is reported at its first line.
    CHECK(find(*table, "2001:db8:ffff::1") == "continued@" + at(22));

    // IPv4-mapped IPv6 clients match IPv4 entries.
    CHECK(find(*table, "::ffff:192.0.2.99") == "DUNNO@" + at(2));
    CHECK(find(*table, "::ffff:10.9.9.9") == "ten@" + at(11));

    CHECK(results_of(*table).size() == 12);
    CHECK(results_of(*table).front() == "DUNNO@" + at(2));
}

TEST_CASE("cidr: first in file wins whichever prefix is longer") {
    TempDir dir;
    const auto wide_first = open_ok(
        "cidr:" + dir.write("a.cidr", "10.0.0.0/8 wide\n10.1.0.0/16 narrow\n10.1.2.3 host\n"),
        KeyKind::ip);
    CHECK(find(*wide_first, "10.1.2.3").starts_with("wide@"));
    CHECK(find(*wide_first, "10.200.0.1").starts_with("wide@"));

    const auto narrow_first = open_ok(
        "cidr:" + dir.write("b.cidr", "10.1.2.3 host\n10.1.0.0/16 narrow\n10.0.0.0/8 wide\n"),
        KeyKind::ip);
    CHECK(find(*narrow_first, "10.1.2.3").starts_with("host@"));
    CHECK(find(*narrow_first, "10.1.2.4").starts_with("narrow@"));
    CHECK(find(*narrow_first, "10.2.0.0").starts_with("wide@"));

    const auto v6 = open_ok("cidr:" + dir.write("c.cidr",
                                                "2001:db8::/32 wide\n"
                                                "2001:db8:1::/48 narrow\n"
                                                "::/0 any-v6\n"
                                                "0.0.0.0/0 any-v4\n"),
                            KeyKind::ip);
    CHECK(find(*v6, "2001:db8:1::1").starts_with("wide@"));
    CHECK(find(*v6, "2001:db9::1").starts_with("any-v6@"));
    CHECK(find(*v6, "192.0.2.1").starts_with("any-v4@"));
    CHECK(find(*v6, "::ffff:192.0.2.1").starts_with("any-v4@"));
}

TEST_CASE("cidr: negation, nested if/endif and address families") {
    TempDir dir;
    const std::string path = dir.write("n.cidr",
                                       "!10.0.0.0/8            not-ten\n"     // 1
                                       "IF 10.0.0.0/8\n"                      // 2
                                       "if !10.1.0.0/16\n"                    // 3
                                       "10.2.0.0/16            ten-two\n"     // 4
                                       "endif\n"                              // 5
                                       "!! 10.1.1.0/24         double-neg\n"  // 6
                                       "ENDIF\n"                              // 7
                                       "10.0.0.0/8             ten\n");       // 8
    const auto table = open_ok("cidr:" + path, KeyKind::ip);
    CHECK(find(*table, "192.0.2.1") == "not-ten@" + path + ":1");
    CHECK(find(*table, "10.2.3.4") == "ten-two@" + path + ":4");
    CHECK(find(*table, "10.1.1.1") == "double-neg@" + path + ":6");
    CHECK(find(*table, "10.1.2.1") == "ten@" + path + ":8");
    CHECK(find(*table, "10.3.0.1") == "ten@" + path + ":8");
    // A negated IPv4 pattern does not match IPv6 clients (Postfix: families never mix).
    CHECK(find(*table, "2001:db8::1") == "-");
}

TEST_CASE("cidr: syntax errors name the file and line") {
    TempDir dir;
    const auto error_for = [&](const std::string& content) {
        return open_error("cidr:" + dir.write("bad.cidr", content), KeyKind::ip);
    };
    const std::string p = dir.path() + "/bad.cidr";

    CHECK(error_for("# ok\n192.0.2.0/24 ok\n192.0.2.1/24 bad\n") ==
          p + ":3: non-null host address bits in \"192.0.2.1/24\", perhaps you should use "
              "\"192.0.2.0/24\" instead");
    CHECK(error_for("\n\n192.0.2.0/24\n") == p + ":3: missing result after \"192.0.2.0/24\"");
    CHECK(error_for("printer.example ok\n") == p + ":1: bad address in \"printer.example\"");
    CHECK(error_for("192.0.2.0/33 x\n") ==
          p + ":1: prefix length 33 is out of range for IPv4 (0-32) in \"192.0.2.0/33\"");
    CHECK(error_for("2001:db8::/129 x\n") ==
          p + ":1: prefix length 129 is out of range for IPv6 (0-128) in \"2001:db8::/129\"");
    CHECK(error_for("10.0.0.0/8 x\nendif\n") == p + ":2: endif without matching if");
    CHECK(error_for("if 10.0.0.0/8\n10.0.0.0/8 x\nif 10.1.0.0/16\nendif\n") ==
          p + ":1: if without matching endif");
    CHECK(error_for("endif x\n") == p + ":1: unexpected text after endif");
    CHECK(error_for("if 10.0.0.0/8\n  10.1.0.0/16 x\nendif\n") ==
          p + ":1: unexpected text \"10.1.0.0/16 x\" after if pattern (a line starting with "
              "whitespace continues the previous line: do not indent inside if)");
    CHECK(error_for("!\n") == p + ":1: missing address pattern");
    // An error in a continued entry is reported at the entry's first line.
    CHECK(error_for("# c\n192.0.2.1/24\n  acs-smtp\n") ==
          p + ":2: non-null host address bits in \"192.0.2.1/24\", perhaps you should use "
              "\"192.0.2.0/24\" instead");
    CHECK(error_for("  192.0.2.0/24 x\n") ==
          p + ":1: line starts with whitespace, but there is no previous line to continue");
    CHECK(error_for(std::string("192.0.2.0/24 ok\n192.0.2.0/24 a\0b\n", 33)) ==
          p + ":2: line contains a NUL byte");
}

TEST_CASE("cidr: CRLF, missing final newline, BOM, comments and blank lines") {
    TempDir dir;
    const std::string path = dir.write("crlf.cidr",
                                       "\xEF\xBB\xBF# exported from a spreadsheet\r\n"
                                       "\r\n"
                                       "   \t\r\n"
                                       "   # indented comment\r\n"
                                       "192.0.2.0/24\tacs-smtp\r\n"
                                       "198.51.100.0/24 exchange-online  \r\n"
                                       "2001:db8::/32 v6");
    const auto table = open_ok("cidr:" + path, KeyKind::ip);
    CHECK(find(*table, "192.0.2.5") == "acs-smtp@" + path + ":5");
    CHECK(find(*table, "198.51.100.5") == "exchange-online@" + path + ":6");
    CHECK(find(*table, "2001:db8::5") == "v6@" + path + ":7");
}

TEST_CASE("cidr: only for client addresses") {
    const std::string spec = "cidr:" + kDataDir + "/sample.cidr";
    CHECK(open_error(spec, KeyKind::address) ==
          spec + ": cidr: tables match client addresses only, not envelope addresses");
    CHECK(open_error(spec, KeyKind::header) ==
          spec + ": cidr: tables match client addresses only, not headers");
}

TEST_CASE("cidr: 5,000 generated entries") {
    TempDir dir;
    std::string content;
    for (int i = 0; i < 5000; ++i) {
        content += "10." + std::to_string(i / 256) + "." + std::to_string(i % 256) +
                   ".0/24 route-" + std::to_string(i) + "\n";
        content += "2001:db8:" + std::to_string(i) + "::/48 v6-" + std::to_string(i) + "\n";
    }
    content += "10.0.0.0/8 catch-all\n";  // line 10001: only reaches what the /24s miss
    const std::string path = dir.write("big.cidr", content);
    const auto table = open_ok("cidr:" + path, KeyKind::ip);

    CHECK(find(*table, "10.0.0.1") == "route-0@" + path + ":1");
    CHECK(find(*table, "10.0.1.77") == "route-1@" + path + ":3");
    CHECK(find(*table, "10.10.100.200") == "route-2660@" + path + ":5321");
    CHECK(find(*table, "10.19.135.1") == "route-4999@" + path + ":9999");
    CHECK(find(*table, "10.19.136.1") == "catch-all@" + path + ":10001");
    CHECK(find(*table, "2001:db8:4999::1") == "v6-4999@" + path + ":10000");
    CHECK(find(*table, "2001:db8:5000::1") == "-");
    CHECK(find(*table, "11.0.0.1") == "-");
    CHECK(results_of(*table).size() == 10001);
}

// ---------------------------------------------------------------------------------------
// regexp: and pcre:

TEST_CASE("regexp: fixture: case-insensitive by default, i flag, delimiters, if/endif") {
    const std::string path = kDataDir + "/sample.regexp";
    const auto table = open_ok("regexp:" + path, KeyKind::text);
    const auto at = [&](int line) { return path + ":" + std::to_string(line); };

    CHECK(table->describe() == "regexp:" + path);
    CHECK(find(*table, "scanner-12.contoso.test") == "exchange-online@" + at(2));
    CHECK(find(*table, "SCANNER-12.Contoso.TEST") == "exchange-online@" + at(2));
    CHECK(find(*table, "printer-3.contoso.test") == "acs-smtp@" + at(3));
    CHECK(find(*table, "CaseSensitive") == "case-sensitive@" + at(4));
    CHECK(find(*table, "casesensitive") == "foreign@" + at(13));
    CHECK(find(*table, "hash/delimited.contoso.test") == "hash-delimiter@" + at(5));
    CHECK(find(*table, "lab-a") == "lab-a@" + at(7));
    CHECK(find(*table, "lab-c") == "lab-not-b@" + at(9));
    CHECK(find(*table, "lab-b") == "lab-b@" + at(12));
    CHECK(find(*table, "other.contoso.test") == "-");
    CHECK(find(*table, "scanner-x.contoso.test") == "-");
    CHECK(find(*table, "") == "foreign@" + at(13));

    CHECK(results_of(*table) ==
          std::vector<std::string>{"exchange-online@" + at(2), "acs-smtp@" + at(3),
                                   "case-sensitive@" + at(4), "hash-delimiter@" + at(5),
                                   "lab-a@" + at(7), "lab-not-b@" + at(9), "lab-b@" + at(12),
                                   "foreign@" + at(13)});
}

TEST_CASE("regexp: the shipped example tables load") {
    const std::string etc = std::string(PAAS_TEST_DATA_DIR) + "/../../../etc/tables";
    const auto subjects = open_ok("regexp:" + etc + "/cert-subjects.regexp", KeyKind::text);
    CHECK(subjects->lookup("scanner-1.contoso.test").has_value());
    const auto devices = open_ok("cidr:" + etc + "/devices.cidr", KeyKind::ip);
    CHECK(devices->lookup("192.0.2.99")->value == "DUNNO");
}

TEST_CASE("regexp: POSIX newline semantics for the m flag") {
    TempDir dir;
    const std::string path = dir.write("m.regexp",
                                       "/^b/       start-only\n"
                                       "/a.b/      dot-newline\n"
                                       "/c$/       dollar\n"
                                       "/^y/m      multi\n"
                                       "/q.r/m     dot-m\n"
                                       "/z$/m      dollar-m\n");
    const auto table = open_ok("regexp:" + path, KeyKind::header);
    // Without m (POSIX default): '^' only at the start, '.' matches a newline, '$' only at
    // the very end.
    CHECK(find(*table, "b\nx").starts_with("start-only@"));
    CHECK(find(*table, "a\nb").starts_with("dot-newline@"));
    CHECK(find(*table, "abc").starts_with("dollar@"));
    CHECK(find(*table, "abc\n") == "-");
    // With m (REG_NEWLINE): '^'/'$' at line breaks, '.' stops at them.
    CHECK(find(*table, "x\ny").starts_with("multi@"));
    CHECK(find(*table, "q\nr") == "-");
    CHECK(find(*table, "qxr").starts_with("dot-m@"));
    CHECK(find(*table, "z\nx").starts_with("dollar-m@"));
}

TEST_CASE("regexp: other delimiters; a line starting with # is a comment, as in Postfix") {
    TempDir dir;
    const std::string path = dir.write("delim.regexp",
                                       "#^commented# never\n"
                                       "!#^a/b#      not-a-slash-b\n"
                                       "if |^x|\n"
                                       "%y$%i        x-y\n"
                                       "endif\n");
    const auto table = open_ok("regexp:" + path, KeyKind::text);
    CHECK(find(*table, "commented").starts_with("not-a-slash-b@"));
    CHECK(find(*table, "a/b/c") == "-");
    CHECK(find(*table, "a/bxy") == "-");
    CHECK(find(*table, "a/bxY") == "-");
    CHECK(results_of(*table).size() == 2);
    const auto inside_if = open_ok(
        "regexp:" + dir.write("if.regexp", "if !#^a/b#\n%y$%i x-y\nendif\n"), KeyKind::text);
    CHECK(find(*inside_if, "xy").starts_with("x-y@"));
    CHECK(find(*inside_if, "xY") == "-");
    CHECK(find(*inside_if, "a/by") == "-");
}

TEST_CASE("regexp: legacy /one/!/two/ form and literal results") {
    TempDir dir;
    const std::string path = dir.write("legacy.regexp",
                                       "/^scan/!/test$/    scan-not-test\n"
                                       "/^cost/            costs $$5\n");
    const auto table = open_ok("regexp:" + path, KeyKind::text);
    CHECK(find(*table, "scanner.prod").starts_with("scan-not-test@"));
    CHECK(find(*table, "scanner.test") == "-");
    CHECK(table->lookup("cost")->value == "costs $5");
}

TEST_CASE("regexp/pcre: syntax errors name the file and line") {
    TempDir dir;
    const auto error_for = [&](const std::string& type, const std::string& content) {
        return open_error(type + ":" + dir.write("bad", content), KeyKind::text);
    };
    const std::string p = dir.path() + "/bad";

    CHECK(error_for("regexp", "/a/ ok\n/b/q nope\n") ==
          p + ":2: unknown flag 'q' after regexp pattern \"/b/\" (valid: i, m)");
    CHECK(error_for("regexp", "/a/x nope\n") ==
          p + ":1: flag 'x' (POSIX basic regular expression syntax) is not supported: regexp: "
              "patterns are always extended regular expressions");
    CHECK(error_for("pcre", "/a/s ok\n\n/b/Z nope\n") ==
          p + ":3: unknown flag 'Z' after pcre pattern \"/b/\" (valid: i, m, s, x, A, E, U, X)");
    CHECK(error_for("regexp", "/a/\n") == p + ":1: missing result after pattern");
    CHECK(error_for("regexp", "/a/i\n") == p + ":1: missing result after pattern");
    CHECK(error_for("regexp", "/(a/ x\n") ==
          p + ":1: bad regular expression \"(a\": missing closing parenthesis at offset 2");
    CHECK(error_for("regexp", "/abc x\n") == p + ":1: no closing delimiter '/' in \"/abc x\"");
    CHECK(error_for("pcre", "/^(.*)$/ $1\n") ==
          p + ":1: result \"$1\" uses $-substitution, which is not supported: results must be "
              "literal (write $$ for a '$')");
    CHECK(error_for("pcre", "/^(.*)$/ x-${1}\n")
              .ends_with("uses $-substitution, which is not "
                         "supported: results must be literal "
                         "(write $$ for a '$')"));
    CHECK(error_for("regexp", "scanner ok\n") ==
          p + ":1: expected \"/pattern/ result\", \"if /pattern/\" or \"endif\", found "
              "\"scanner ok\"");
    CHECK(error_for("regexp", "if /a/\n/b/ x\n") == p + ":1: if without matching endif");
    CHECK(error_for("regexp", "/b/ x\nendif\n") == p + ":2: endif without matching if");
    CHECK(error_for("regexp", "if /a/\n  /b/ x\nendif\n") ==
          p + ":1: unexpected text \"/b/ x\" after if pattern (a line starting with whitespace "
              "continues the previous line: do not indent inside if)");
    CHECK(error_for("regexp", "if\n") == p + ":1: missing /pattern/");
    CHECK(error_for("regexp", "/a/!/b/!/c/ x\n") ==
          p + ":1: unexpected \"!/c/ x\" after the second pattern");
    CHECK(error_for("regexp", "/\xff\xfe/ x\n").starts_with(p + ":1: bad regular expression"));
}

TEST_CASE("pcre: flags") {
    TempDir dir;
    const std::string path = dir.write("flags.pcre",
                                       "/^exact$/i            case\n"       // 1
                                       "/a.b/s                dotall\n"     // 2
                                       "/^two$/m              multi\n"      // 3
                                       "/ x y z /x            extended\n"   // 4
                                       "/anch/A               anchored\n"   // 5
                                       "/end$/E               endonly\n"    // 6
                                       "/<(.+)>/UX            ungreedy\n"   // 7
                                       "/^tog$/ii             toggled\n");  // 8
    const auto table = open_ok("pcre:" + path, KeyKind::header);
    CHECK(find(*table, "exact").starts_with("case@"));
    CHECK(find(*table, "EXACT") == "-");
    CHECK(find(*table, "a\nb").starts_with("dotall@"));
    CHECK(find(*table, "one\ntwo\nthree").starts_with("multi@"));
    CHECK(find(*table, "xyz").starts_with("extended@"));
    CHECK(find(*table, "anchor").starts_with("anchored@"));
    CHECK(find(*table, "x anchor") == "-");
    CHECK(find(*table, "the end").starts_with("endonly@"));
    CHECK(find(*table, "the end\n") == "-");
    CHECK(find(*table, "<a>").starts_with("ungreedy@"));
    CHECK(find(*table, "TOG").starts_with("toggled@"));
}

TEST_CASE("pcre: fixture with PCRE syntax and UTF-8") {
    const std::string path = kDataDir + "/sample.pcre";
    const auto table = open_ok("pcre:" + path, KeyKind::header);
    CHECK(find(*table, "Subject: disk full [ALERT]") == "alert@" + path + ":2");
    CHECK(find(*table, "subject: [alert] x") == "alert@" + path + ":2");
    CHECK(find(*table, "X-Mailer: scan42") == "device-mailer@" + path + ":3");
    CHECK(find(*table, "From:  \"Scanner 3\" <s@x>") == "scanner-from@" + path + ":4");
    CHECK(find(*table, "Subject: ÜNÏCÖDÉ") == "unicode@" + path + ":5");
}

TEST_CASE("regex tables: invalid UTF-8 and NUL bytes in keys are harmless") {
    const auto table = open_ok("pcre:" + kDataDir + "/sample.pcre", KeyKind::header);
    // Latin-1 or broken bytes do not stop ".*" from spanning them.
    CHECK(find(*table, "Subject: St\xf6rung [ALERT]").starts_with("alert@"));
    CHECK(find(*table, "Subject: \xff\xfe [ALERT] \xc3").starts_with("alert@"));
    CHECK(find(*table, "Subject: \xc3 broken \xe2\x82") == "-");
    CHECK(find(*table, "Subject: \xed\xa0\x80 surrogate \xf4\x90\x80\x80 [alert]")
              .starts_with("alert@"));
    CHECK(find(*table, std::string("Subject: a\0b [ALERT]", 20)).starts_with("alert@"));
    CHECK(find(*table, std::string(100000, '\xff')) == "-");

    const auto inline_table = inline_ok({"/^ok.$/"}, KeyKind::text);
    CHECK(find(*inline_table, "ok\xc0") == "@rules.toml:10");
    CHECK(find(*inline_table, "\xc0\xaf") == "-");
}

TEST_CASE("valid_utf8") {
    std::string storage;
    CHECK(valid_utf8("plain", storage) == "plain");
    CHECK(valid_utf8("gr\xc3\xbc\xc3\x9f \xf0\x9f\x98\x80", storage) ==
          "gr\xc3\xbc\xc3\x9f \xf0\x9f\x98\x80");
    CHECK(valid_utf8("St\xf6rung", storage) == "St\xef\xbf\xbdrung");
    CHECK(valid_utf8("\xc0\xaf", storage) == "\xef\xbf\xbd\xef\xbf\xbd");    // overlong
    CHECK(valid_utf8("a\xe2\x82", storage) == "a\xef\xbf\xbd\xef\xbf\xbd");  // truncated
    // Raw matching on invalid input is safe too: invalid bytes just never match.
    auto regex = Regex::compile("^a.b$");
    REQUIRE(regex.ok());
    CHECK(regex->try_match("a\xff"
                           "b") == std::optional<bool>(false));
    CHECK(
        regex->matches(valid_utf8("a\xff"
                                  "b",
                                  storage)));
}

TEST_CASE("Regex: compile errors, JIT and concurrent matching") {
    auto bad = Regex::compile("a(b");
    REQUIRE_FALSE(bad.ok());
    CHECK(bad.error().message ==
          "bad regular expression \"a(b\": missing closing parenthesis at offset 3");

    auto regex = Regex::compile("^scanner-[0-9]+$");
    REQUIRE(regex.ok());
    CHECK(regex->matches("SCANNER-1"));
    CHECK_FALSE(regex->matches("scanner-"));
    CHECK(regex->pattern() == "^scanner-[0-9]+$");

    // Catastrophic backtracking: PCRE2 gives up instead of hanging, and says so.
    auto slow = Regex::compile("^(a+)+$");
    REQUIRE(slow.ok());
    CHECK(slow->try_match(std::string(30, 'a') + "b") != std::optional<bool>(true));

    std::atomic<int> wrong{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < 8; ++t) {
        threads.emplace_back([&, t] {
            for (int i = 0; i < 2000; ++i) {
                const bool expect = (i + t) % 2 == 0;
                const std::string subject = expect ? "scanner-" + std::to_string(i) : "printer";
                if (regex->matches(subject) != expect) ++wrong;
            }
        });
    }
    for (auto& thread : threads) thread.join();
    CHECK(wrong == 0);
}

// ---------------------------------------------------------------------------------------
// texthash:

TEST_CASE("texthash: access(5) search order for envelope addresses") {
    const std::string path = kDataDir + "/sample.texthash";
    const auto table = open_ok("texthash:" + path, KeyKind::address);
    const auto at = [&](int line) { return path + ":" + std::to_string(line); };

    CHECK(find(*table, "erp@contoso.com") == "exchange-online@" + at(2));
    CHECK(find(*table, "ERP@CONTOSO.com") == "exchange-online@" + at(2));
    CHECK(find(*table, "<erp@contoso.com>") == "exchange-online@" + at(2));
    CHECK(find(*table, "someone@contoso.com") == "acs-smtp@" + at(3));
    // A bare parent domain also matches subdomains (parent_domain_matches_subdomains).
    CHECK(find(*table, "someone@mail.contoso.com") == "acs-smtp@" + at(3));
    CHECK(find(*table, "someone@corp.contoso.com") == "acs-smtp@" + at(3));
    // ".corp.contoso.com" matches below corp.contoso.com and is tried before contoso.com.
    CHECK(find(*table, "someone@a.corp.contoso.com") == "subdomains-of-corp@" + at(4));
    CHECK(find(*table, "someone@x.a.corp.contoso.com") == "subdomains-of-corp@" + at(4));
    // Domain lookups come before "user@".
    CHECK(find(*table, "postmaster@contoso.com") == "acs-smtp@" + at(3));
    CHECK(find(*table, "postmaster@example.org") == "local-part@" + at(5));
    CHECK(find(*table, "Postmaster") == "local-part@" + at(5));
    // The null sender is looked up as "<>".
    CHECK(find(*table, "") == "null-sender@" + at(6));
    CHECK(find(*table, "<>") == "null-sender@" + at(6));
    CHECK(find(*table, "someone@contoso.com.evil.example") == "-");
    CHECK(find(*table, "someone@notcontoso.com") == "-");
    CHECK(find(*table, "someone@example.org") == "-");
    CHECK(find(*table, "someone@[192.0.2.1]") == "-");
}

TEST_CASE("texthash: client addresses, text keys, continuation, errors") {
    TempDir dir;
    const std::string ip_path = dir.write("ip.texthash",
                                          "192.0.2.7 host\n"
                                          "192.0.2 net24\n"
                                          "10 net8\n"
                                          "2001:DB8::1 v6-host\n"
                                          "2001:db8 v6-never\n");
    const auto ips = open_ok("texthash:" + ip_path, KeyKind::ip);
    CHECK(find(*ips, "192.0.2.7") == "host@" + ip_path + ":1");
    CHECK(find(*ips, "192.0.2.8") == "net24@" + ip_path + ":2");
    CHECK(find(*ips, "::ffff:192.0.2.9") == "net24@" + ip_path + ":2");
    CHECK(find(*ips, "10.20.30.40") == "net8@" + ip_path + ":3");
    CHECK(find(*ips, "2001:db8::1") == "v6-host@" + ip_path + ":4");
    CHECK(find(*ips, "2001:db8::2") == "-");
    CHECK(find(*ips, "11.0.0.1") == "-");

    const std::string text_path = dir.write("cn.texthash",
                                            "Scanner-1.Contoso.Test exchange-online\n"
                                            "printer-1.contoso.test\n"
                                            "    acs-smtp   \n");
    const auto names = open_ok("texthash:" + text_path, KeyKind::text);
    CHECK(find(*names, "SCANNER-1.contoso.test") == "exchange-online@" + text_path + ":1");
    CHECK(find(*names, "printer-1.contoso.test") == "acs-smtp@" + text_path + ":2");
    CHECK(find(*names, "printer-1") == "-");
    CHECK(find(*names, "\xff\xfe\x00") == "-");
    CHECK(results_of(*names).size() == 2);

    const std::string dup = dir.write("dup.texthash", "a@x.test one\n# c\nA@X.TEST two\n");
    CHECK(open_error("texthash:" + dup, KeyKind::address) ==
          dup + ":3: duplicate key \"a@x.test\" (first at " + dup + ":1)");
    const std::string lone = dir.write("lone.texthash", "a@x.test one\nlonely\n");
    CHECK(open_error("texthash:" + lone, KeyKind::address) ==
          lone + ":2: missing value after key \"lonely\"");
    CHECK(open_error("texthash:" + lone, KeyKind::header) ==
          "texthash:" + lone + ": header patterns need a regexp: or pcre: table, not texthash:");
}

TEST_CASE("texthash: 5,000 generated entries") {
    TempDir dir;
    std::string content;
    for (int i = 0; i < 5000; ++i) {
        content += "device" + std::to_string(i) + "@plant" + std::to_string(i % 7) +
                   ".example route-" + std::to_string(i) + "\n";
    }
    const std::string path = dir.write("big.texthash", content);
    const auto table = open_ok("texthash:" + path, KeyKind::address);
    CHECK(find(*table, "device0@plant0.example") == "route-0@" + path + ":1");
    CHECK(find(*table, "DEVICE4321@plant2.example") == "route-4321@" + path + ":4322");
    CHECK(find(*table, "device4321@plant3.example") == "-");
}

// ---------------------------------------------------------------------------------------
// Inline tables from the TOML file

TEST_CASE("inline: client addresses, first listed wins") {
    const auto table = inline_ok(
        {"10.0.0.0/8", "10.1.2.3", "2001:db8::/32", "::1", "[2001:db8:1::]/48"}, KeyKind::ip);
    CHECK(table->describe() == "inline:rules[0].test");
    CHECK(find(*table, "10.1.2.3") == "@rules.toml:10");
    CHECK(find(*table, "::ffff:10.1.2.3") == "@rules.toml:10");
    CHECK(find(*table, "2001:db8:1::1") == "@rules.toml:12");
    CHECK(find(*table, "::1") == "@rules.toml:13");
    CHECK(find(*table, "127.0.0.1") == "-");
    CHECK(find(*table, "not an address") == "-");
    CHECK(results_of(*table).empty());

    const auto reversed = inline_ok({"10.1.2.3", "10.0.0.0/8"}, KeyKind::ip);
    CHECK(find(*reversed, "10.1.2.3") == "@rules.toml:10");
    CHECK(find(*reversed, "10.1.2.4") == "@rules.toml:11");

    CHECK(inline_error({"10.0.0.0/8", "10.0.0.1/8"}, KeyKind::ip) ==
          "rules.toml:11: non-null host address bits in \"10.0.0.1/8\", perhaps you should use "
          "\"10.0.0.0/8\" instead");
    CHECK(inline_error({"printer.example"}, KeyKind::ip) ==
          "rules.toml:10: bad address in \"printer.example\"");
}

TEST_CASE("inline: envelope addresses") {
    const auto table = inline_ok({"erp.contoso.com",     // 10: domain and subdomains
                                  "@exact.example",      // 11: that domain only
                                  "Boss@Example.org",    // 12: one address
                                  "postmaster@",         // 13: local part
                                  "",                    // 14: null sender
                                  "/^noreply-[0-9]+@/",  // 15: regex
                                  ".sub.example"},       // 16: subdomains only
                                 KeyKind::address);
    CHECK(find(*table, "x@erp.contoso.com") == "@rules.toml:10");
    CHECK(find(*table, "x@a.erp.contoso.com") == "@rules.toml:10");
    CHECK(find(*table, "X@ERP.CONTOSO.COM") == "@rules.toml:10");
    CHECK(find(*table, "x@contoso.com") == "-");
    CHECK(find(*table, "x@exact.example") == "@rules.toml:11");
    CHECK(find(*table, "x@a.exact.example") == "-");
    CHECK(find(*table, "boss@example.org") == "@rules.toml:12");
    CHECK(find(*table, "other@example.org") == "-");
    CHECK(find(*table, "postmaster@anywhere.test") == "@rules.toml:13");
    CHECK(find(*table, "") == "@rules.toml:14");
    CHECK(find(*table, "<>") == "@rules.toml:14");
    CHECK(find(*table, "NoReply-7@x.test") == "@rules.toml:15");
    CHECK(find(*table, "a@b.sub.example") == "@rules.toml:16");
    CHECK(find(*table, "a@sub.example") == "-");
    // The earliest listed entry wins, whatever kind of key found it.
    CHECK(find(*table, "postmaster@erp.contoso.com") == "@rules.toml:10");
    const auto regex_first = inline_ok({"/@erp\\./", "erp.contoso.com"}, KeyKind::address);
    CHECK(find(*regex_first, "x@erp.contoso.com") == "@rules.toml:10");
    const auto exact_first = inline_ok({"erp.contoso.com", "/@erp\\./"}, KeyKind::address);
    CHECK(find(*exact_first, "x@erp.contoso.com") == "@rules.toml:10");
    CHECK(find(*exact_first, "x@erp.fabrikam.com") == "@rules.toml:11");
}

TEST_CASE("inline: text and header patterns") {
    const auto text =
        inline_ok({" Contoso Device CA ", "/^scanner-[0-9]+$/", "/^Exact$/i"}, KeyKind::text);
    CHECK(find(*text, "contoso device ca") == "@rules.toml:10");
    CHECK(find(*text, "Contoso Device CA2") == "-");
    CHECK(find(*text, "SCANNER-12") == "@rules.toml:11");
    CHECK(find(*text, "Exact") == "@rules.toml:12");
    CHECK(find(*text, "exact") == "-");

    const auto header = inline_ok({"/^Subject:.*\\[ALERT\\]/"}, KeyKind::header);
    CHECK(find(*header, "Subject: disk [alert]") == "@rules.toml:10");
    CHECK(find(*header, "From: [ALERT]") == "-");

    CHECK(inline_error({"/^a/", "Subject: x"}, KeyKind::header) ==
          "rules.toml:11: header patterns must be /regex/, found \"Subject: x\"");
    CHECK(inline_error({"/^a/q"}, KeyKind::text) ==
          "rules.toml:10: unknown flag 'q' after regexp pattern \"/^a/\" (valid: i, m)");
    CHECK(inline_error({"/^a/ extra"}, KeyKind::text) ==
          "rules.toml:10: unexpected text \"extra\" after /pattern/flags");
    CHECK(inline_error({"/(/"}, KeyKind::address) ==
          "rules.toml:10: bad regular expression \"(\": missing closing parenthesis at offset 1");
}

TEST_CASE("inline: entries without a file report the inline label") {
    auto table = make_inline_table({InlineEntry{"10.0.0.0/8", "", 0}}, KeyKind::ip, "cli");
    REQUIRE(table.ok());
    CHECK(find(**table, "10.0.0.1") == "@inline:cli");
}

// ---------------------------------------------------------------------------------------
// Table references and open_table errors

TEST_CASE("is_table_reference") {
    for (const char* spec : {"cidr:/etc/x", "regexp:/x", "pcre:x", "texthash:/x", "hash:/x",
                             "lmdb:/x", "btree:/x", "ldap:/etc/ldap.cf", "cidr:"}) {
        CHECK_MESSAGE(is_table_reference(spec), spec);
    }
    for (const char* spec : {"2001:db8::/32", "::1", "::ffff:192.0.2.7", "fe80::1", "cafe:db8::1",
                             "dead:beef::", "/x/", "erp.contoso.com", "user@example.com",
                             "192.0.2.0/24", "", "CIDR:/x", "Subject: hello", "unknown"}) {
        CHECK_MESSAGE(!is_table_reference(spec), spec);
    }
}

TEST_CASE("open_table: reference errors") {
    TempDir dir;
    CHECK(open_error("cidr:/nonexistent/devices.cidr", KeyKind::ip) ==
          "cannot open cidr:/nonexistent/devices.cidr: No such file or directory");
    CHECK(open_error("cidr:" + dir.path(), KeyKind::ip).starts_with("cannot "));
    CHECK(open_error("hash:/etc/postfix/access", KeyKind::address) ==
          "hash: tables are Berkeley DB files built by postmap; use texthash: on the source "
          "file instead");
    CHECK(open_error("lmdb:/etc/postfix/access", KeyKind::address) ==
          "lmdb: tables are LMDB files built by postmap; use texthash: on the source file "
          "instead");
    CHECK(open_error("ldap:/etc/postfix/ldap.cf", KeyKind::address) ==
          "unsupported table type \"ldap:\" in \"ldap:/etc/postfix/ldap.cf\"; supported types: "
          "cidr:, pcre:, regexp:, texthash:");
    CHECK(open_error("2001:db8::/32", KeyKind::ip) ==
          "\"2001:db8::/32\" is not a table reference (type:path); supported types: cidr:, "
          "pcre:, regexp:, texthash:");
    CHECK(open_error("regexp:", KeyKind::text) == "missing file name in \"regexp:\"");
}

TEST_CASE("tables: concurrent lookups give the same answers") {
    const auto cidr = open_ok("cidr:" + kDataDir + "/sample.cidr", KeyKind::ip);
    const auto regexp = open_ok("regexp:" + kDataDir + "/sample.regexp", KeyKind::text);
    const auto hash = open_ok("texthash:" + kDataDir + "/sample.texthash", KeyKind::address);
    std::atomic<int> wrong{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < 8; ++t) {
        threads.emplace_back([&] {
            for (int i = 0; i < 1000; ++i) {
                if (cidr->lookup("172.16.5.9")->value != "lab") ++wrong;
                if (regexp->lookup("lab-c")->value != "lab-not-b") ++wrong;
                if (hash->lookup("x@a.corp.contoso.com")->value != "subdomains-of-corp") ++wrong;
                if (cidr->lookup("8.8.8.8")) ++wrong;
            }
        });
    }
    for (auto& thread : threads) thread.join();
    CHECK(wrong == 0);
}

// ---------------------------------------------------------------------------------------
// The literal prefilter of regexp:/pcre: tables, and the jump tables of the cidr trie: both
// must answer exactly as the plain walks do.

namespace {

using Factors = std::vector<std::vector<std::string>>;

Factors factors_of(std::string_view pattern, const RegexOptions& options = {}) {
    return required_literals(pattern, options).factors;
}

// ASCII lowercase, KELVIN SIGN as 'k', LONG S as 's': how PCRE2 (UTF, caseless) can equate
// text with an ASCII literal.
std::string fold(std::string_view text) {
    std::string out;
    for (std::size_t i = 0; i < text.size(); ++i) {
        if (text.substr(i, 3) == "\xE2\x84\xAA") {
            out += 'k';
            i += 2;
        } else if (text.substr(i, 2) == "\xC5\xBF") {
            out += 's';
            i += 1;
        } else {
            const char c = text[i];
            out += (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c;
        }
    }
    return out;
}

// Random text over a few characters, so that random patterns often match it. Some
// characters are the non-ASCII ones PCRE2 equates with 'k' and 's'.
std::string random_text(std::mt19937& random, std::size_t max_length) {
    static const std::vector<std::string> kPieces = {
        "a", "b", "A", "B", "k", "K", "s", "S", "1", "-", ".", " ", ":", "\xE2\x84\xAA", "\xC5\xBF",
    };
    std::string out;
    const std::size_t length = random() % (max_length + 1);
    for (std::size_t i = 0; i < length; ++i) out += kPieces[random() % kPieces.size()];
    return out;
}

// A random PCRE2 pattern over the same characters: literals, escapes, classes, dots,
// quantifiers, groups with alternatives, lookahead and anchors.
std::string random_pattern(std::mt19937& random, int depth = 0) {
    static const std::vector<std::string> kAtoms = {
        "a", "b", "A",           "k",    "s",    "S",   "1",   "-",   "\\.",
        " ", ":", ".",           "[ab]", "[^a]", "\\d", "\\s", "\\w", "\\b",
        "^", "$", "[[:alpha:]]", "\\-",  "ab",   "ks",  "s:",
    };
    // "{,1}" is a quantifier from PCRE2 10.43 on, literal text before: either way the
    // reading must stay sound.
    static const std::vector<std::string> kQuantifiers = {
        "", "", "", "?", "*", "+", "{2}", "{0,2}", "{1,}", "??", "*+", "{,1}",
    };
    std::string out;
    const int items = 1 + static_cast<int>(random() % 5);
    for (int i = 0; i < items; ++i) {
        std::string atom;
        if (depth < 2 && random() % 6 == 0) {
            static const std::vector<std::string> kOpen = {"(", "(?:", "(?=", "(?<n>", "(?>"};
            std::string open = kOpen[random() % kOpen.size()];
            if (open == "(?<n>") open = "(?<n" + std::to_string(random()) + ">";
            atom = open + random_pattern(random, depth + 1);
            if (random() % 2) atom += "|" + random_pattern(random, depth + 1);
            atom += ")";
        } else {
            atom = kAtoms[random() % kAtoms.size()];
        }
        const bool quantifiable = atom != "^" && atom != "$" && atom != "\\b";
        out += atom + (quantifiable ? kQuantifiers[random() % kQuantifiers.size()] : "");
    }
    return out;
}

bool factors_hold(const Factors& factors, std::string_view subject) {
    const std::string folded = fold(subject);
    return std::all_of(factors.begin(), factors.end(), [&](const std::vector<std::string>& any) {
        return std::any_of(any.begin(), any.end(), [&](const std::string& text) {
            return folded.find(text) != std::string::npos;
        });
    });
}

}  // namespace

TEST_CASE("required_literals: the literal runs every match passes through") {
    CHECK(factors_of("^Subject:.*\\bviagra\\b") == Factors{{"subject:"}, {"viagra"}});
    CHECK(factors_of("^X-Mailer: OldScan Firmware 1\\.") ==
          Factors{{"x-mailer: oldscan firmware 1."}});
    // An optional item ends a run and is not required; a repeated one is, once.
    CHECK(factors_of("colou?r") == Factors{{"colo"}, {"r"}});
    CHECK(factors_of("ab*c") == Factors{{"a"}, {"c"}});
    CHECK(factors_of("ab+c") == Factors{{"ab"}, {"c"}});
    CHECK(factors_of("ab{2,3}c") == Factors{{"ab"}, {"c"}});
    CHECK(factors_of("ab{0,3}c") == Factors{{"a"}, {"c"}});
    CHECK(factors_of("ab{,3}c") == Factors{{"a"}, {"c"}});
    CHECK(factors_of("ab*?c") == Factors{{"a"}, {"c"}});
    // Groups count unless optional; alternatives make one factor of choices.
    CHECK(factors_of("^From:.*@(?:[a-z0-9-]+\\.)*spam\\.example\\b") ==
          Factors{{"from:"}, {"@"}, {"spam.example"}});
    CHECK(factors_of("(?:Firmware|FW) [0-3]") == Factors{{"firmware", "fw"}, {" "}});
    CHECK(factors_of("(cheap|free) (pills)?") == Factors{{"cheap", "free"}, {" "}});
    CHECK(factors_of("(?<name>abc)d") == Factors{{"abc"}, {"d"}});
    CHECK(factors_of("foo|bar") == Factors{{"bar", "foo"}});
    CHECK(factors_of("foo|").empty());                    // the empty branch needs nothing
    CHECK(factors_of("(?=abc)abd") == Factors{{"abd"}});  // a lookahead consumes nothing
    // Classes, escapes and dots are atoms between runs; an escaped metacharacter is text.
    CHECK(factors_of("a[]b]c\\d.e\\.f") == Factors{{"a"}, {"c"}, {"e.f"}});
    CHECK(factors_of("[[:alpha:]]x") == Factors{{"x"}});
    // Lowercased; a non-ASCII character ends a run; long runs are cut.
    CHECK(factors_of("ABC\xc3\xa4"
                     "DEF") == Factors{{"abc"}, {"def"}});
    CHECK(factors_of(std::string(40, 'x')) == Factors{{std::string(kMaxRequiredLiteral, 'x')}});
    // Syntax beyond this reading yields nothing rather than something wrong.
    for (const char* pattern :
         {"(?i)abc", "(*UTF)abc", "\\Qa.b\\E", "a\\x41b", "(a)\\1abc", "a{foo}", "(?(1)a|b)",
          "(?#c)abc", "\\p{L}abc", "abc\\", "[\\Q]\\E]abc", "\\N{U+41}abc"}) {
        CAPTURE(pattern);
        CHECK(factors_of(pattern).empty());
    }
    RegexOptions extended;
    extended.extended = true;
    CHECK(factors_of("abc", extended).empty());
}

TEST_CASE("required_literals: every match contains them (random patterns and subjects)") {
    std::mt19937 random(20261124);  // fixed seed: reproducible
    int matches = 0;
    for (int p = 0; p < 3000; ++p) {
        const std::string pattern = random_pattern(random);
        RegexOptions options;
        options.caseless = random() % 3 != 0;
        auto regex = Regex::compile(pattern, options);
        REQUIRE_MESSAGE(regex.ok(), pattern);
        const Factors factors = factors_of(pattern, options);
        for (int s = 0; s < 20; ++s) {
            const std::string subject = random_text(random, 10);
            if (!regex->matches(subject)) continue;
            ++matches;
            CAPTURE(pattern);
            CAPTURE(subject);
            CHECK(factors_hold(factors, subject));
        }
    }
    CHECK(matches > 5000);  // the data really exercises matches
}

TEST_CASE("PCRE2 takes no character but KELVIN SIGN and LONG S for an ASCII one") {
    // The prefilter's folding relies on this (see LiteralMatcher); a PCRE2 that adds
    // case-equivalents (e.g. Turkish dotless i by default) must fail here, not misroute.
    RegexOptions caseless;
    auto ascii = Regex::compile("[\\x21-\\x7e]", caseless);
    REQUIRE(ascii.ok());
    std::vector<std::uint32_t> equivalents;
    std::string text;
    for (std::uint32_t cp = 0x80; cp < 0x110000; ++cp) {
        if (cp >= 0xD800 && cp < 0xE000) continue;
        text.clear();
        if (cp < 0x800) {
            text += static_cast<char>(0xC0 | cp >> 6);
        } else if (cp < 0x10000) {
            text += static_cast<char>(0xE0 | cp >> 12);
            text += static_cast<char>(0x80 | (cp >> 6 & 0x3F));
        } else {
            text += static_cast<char>(0xF0 | cp >> 18);
            text += static_cast<char>(0x80 | (cp >> 12 & 0x3F));
            text += static_cast<char>(0x80 | (cp >> 6 & 0x3F));
        }
        text += static_cast<char>(0x80 | (cp & 0x3F));
        if (ascii->matches(text)) equivalents.push_back(cp);
    }
    CHECK(equivalents == std::vector<std::uint32_t>{0x017F, 0x212A});
}

TEST_CASE("LiteralMatcher: finds every occurrence, ignoring case, KELVIN SIGN and LONG S") {
    std::mt19937 random(7);
    for (int round = 0; round < 200; ++round) {
        std::vector<std::pair<std::string, std::uint32_t>> literals;
        const int count = 1 + static_cast<int>(random() % 40);
        for (int i = 0; i < count; ++i) {
            std::string text;
            while (text.size() < LiteralMatcher::kMinLength) {
                text = fold(random_text(random, 7));
            }
            // Letters, digits and these punctuation characters fold exactly under | 0x20.
            std::replace(text.begin(), text.end(), ':', 'b');
            if (text.find_first_not_of("abks1-. ") != std::string::npos) continue;
            literals.emplace_back(text, static_cast<std::uint32_t>(i));
            if (random() % 5 == 0) literals.emplace_back(text, 1000 + i);  // a shared string
        }
        if (literals.empty()) continue;
        auto matcher = LiteralMatcher::build(literals);
        REQUIRE(matcher.has_value());
        for (int t = 0; t < 30; ++t) {
            std::string text = random_text(random, 60);
            if (random() % 3 == 0) {  // plant a literal, in random case
                std::string planted = literals[random() % literals.size()].first;
                for (char& c : planted) {
                    if (random() % 2) c = static_cast<char>(std::toupper(c));
                }
                text.insert(random() % (text.size() + 1), planted);
            }
            std::set<std::uint32_t> found;
            matcher->for_each_match(text, [&](std::uint32_t id) { found.insert(id); });
            std::set<std::uint32_t> expected;
            const std::string folded = fold(text);
            for (const auto& [literal, id] : literals) {
                if (folded.find(literal) != std::string::npos) expected.insert(id);
            }
            CAPTURE(text);
            CHECK(found == expected);
        }
    }
    CHECK_FALSE(LiteralMatcher::build({}).has_value());
    CHECK_FALSE(LiteralMatcher::build({{"abc", 1}}).has_value());  // shorter than kMinLength
}

TEST_CASE("regexp/pcre tables: the prefiltered walk answers as the plain one") {
    // Random tables in pcre_table(5) syntax (negations, two-pattern lines, nested ifs,
    // flags), evaluated here one regex at a time, in file order.
    struct Line {
        int kind = 0;  // 0: "/p/ result", 1: "if /p/", 2: "endif"
        std::string first;
        bool first_negated = false;
        bool first_caseless = true;
        std::optional<std::string> second;  // "!/p/": must not match
        std::string result;
    };
    std::mt19937 random(42);
    TempDir dir;
    int answered = 0;
    for (int round = 0; round < 60; ++round) {
        std::vector<Line> lines;
        int open = 0;
        const int count = 8 + static_cast<int>(random() % 40);
        for (int i = 0; i < count; ++i) {
            Line line;
            const unsigned roll = random() % 12;
            if (roll == 0 && open < 3) {
                line.kind = 1;
                ++open;
            } else if (roll == 1 && open > 0) {
                line.kind = 2;
                --open;
            }
            if (line.kind != 2) {
                line.first = random_pattern(random);
                line.first_negated = random() % 6 == 0;
                line.first_caseless = random() % 4 != 0;
                if (line.kind == 0 && random() % 8 == 0) line.second = random_pattern(random);
                line.result = "r" + std::to_string(i);
            }
            lines.push_back(line);
        }
        for (; open > 0; --open) lines.push_back(Line{2, {}, false, true, std::nullopt, {}});

        std::string file;
        for (const Line& line : lines) {
            if (line.kind == 2) {
                file += "endif\n";
                continue;
            }
            const std::string first = std::string(line.first_negated ? "!" : "") + "/" +
                                      line.first + "/" + (line.first_caseless ? "" : "i");
            if (line.kind == 1) {
                file += "if " + first + "\n";
            } else {
                file += first + (line.second ? "!/" + *line.second + "/" : "") + " " + line.result +
                        "\n";
            }
        }
        const std::string path = dir.write("random.pcre", file);
        const auto table = open_ok("pcre:" + path, KeyKind::text);

        // The plain walk.
        const auto expected = [&](const std::string& key) -> std::string {
            std::vector<bool> skipping;  // per open if: its condition failed
            const auto compile = [](const std::string& pattern, bool caseless) {
                RegexOptions options;
                options.caseless = caseless;
                return std::move(Regex::compile(pattern, options)).value();
            };
            for (const Line& line : lines) {
                const bool skipped =
                    std::find(skipping.begin(), skipping.end(), true) != skipping.end();
                if (line.kind == 2) {
                    skipping.pop_back();
                    continue;
                }
                bool holds = false;
                if (!skipped) {
                    holds =
                        compile(line.first, line.first_caseless).matches(key) != line.first_negated;
                    if (holds && line.second) holds = !compile(*line.second, true).matches(key);
                }
                if (line.kind == 1) {
                    skipping.push_back(!holds);
                } else if (holds) {
                    return line.result;
                }
            }
            return "-";
        };
        for (int k = 0; k < 40; ++k) {
            const std::string key = random_text(random, 12);
            const auto match = table->lookup(key);
            const std::string got = match ? match->value : "-";
            CAPTURE(file);
            CAPTURE(key);
            CHECK(got == expected(key));
            answered += got != "-";
        }
    }
    CHECK(answered > 300);
}

TEST_CASE("regexp tables: a thousand header checks, with and without their text") {
    TempDir dir;
    std::string file = "if /^Subject:/\n";
    for (int i = 0; i < 1000; ++i) {
        file += "/^Subject:.*\\bword" + std::to_string(i) + "x\\b/ r" + std::to_string(i) + "\n";
    }
    file += "endif\n/^From:.*@(spam|junk)[0-9]+\\.example/ from\n/\\bsex\\b/ short\n";
    const std::string path = dir.write("checks.regexp", file);
    const auto table = open_ok("regexp:" + path, KeyKind::header);
    CHECK(find(*table, "Subject: about word17x today") == "r17@" + path + ":19");
    CHECK(find(*table, "SUBJECT: ABOUT WORD999X") == "r999@" + path + ":1001");
    CHECK(find(*table, "Subject: word17xx") == "-");
    CHECK(find(*table, "X-Subject: word17x") == "-");  // the if-block does not hold
    CHECK(find(*table, "From: <a@junk12.example>") == "from@" + path + ":1003");
    CHECK(find(*table, "From: <a@junk.example>") == "-");
    CHECK(find(*table, "Comments: sex") == "short@" + path + ":1004");  // unfiltered entry
    // Matching ignores case the way PCRE2 does: KELVIN SIGN is a 'k', LONG S an 's'.
    CHECK(find(*table,
               "From: <a@jun\xE2\x84\xAA"
               "1.example>") == "from@" + path + ":1003");
    CHECK(find(*table,
               "\xC5\xBF"
               "ubject: word5x") == "r5@" + path + ":7");
}

TEST_CASE("cidr tables: jump tables answer as the plain trie walk and a linear scan") {
    std::mt19937 random(99);
    PrefixTrie trie;
    std::vector<IpNetwork> networks;
    for (std::uint32_t i = 0; i < 20000; ++i) {
        IpAddress address;
        int length = 0;
        if (random() % 3 != 0) {  // dense IPv4: 10.0.0.0/14
            address.family = IpFamily::v4;
            address.bytes = {10, static_cast<std::uint8_t>(random() % 4),
                             static_cast<std::uint8_t>(random()),
                             static_cast<std::uint8_t>(random())};
            length = static_cast<int>(14 + random() % 19);
        } else {  // IPv6 under 2001:db8:0:0::/56
            address.family = IpFamily::v6;
            address.bytes = {0x20, 0x01, 0x0d, 0xb8};
            for (int b = 7; b < 16; ++b) address.bytes[b] = static_cast<std::uint8_t>(random());
            length = static_cast<int>(56 + random() % 73);
        }
        for (int bit = length; bit < 128; ++bit) {
            address.bytes[bit / 8] &= static_cast<std::uint8_t>(~(0x80u >> (bit % 8)));
        }
        networks.push_back(IpNetwork{address, length});
        trie.insert(networks.back(), i);
    }
    std::vector<IpAddress> probes;
    for (int p = 0; p < 5000; ++p) {
        IpAddress address = networks[random() % networks.size()].address;
        const int bits = address.bit_count();
        for (int flips = static_cast<int>(random() % 4); flips > 0; --flips) {
            const int bit = bits - 1 - static_cast<int>(random() % 24);
            address.bytes[bit / 8] ^= static_cast<std::uint8_t>(0x80u >> (bit % 8));
        }
        probes.push_back(address);
    }
    std::vector<std::uint32_t> plain;
    for (const IpAddress& address : probes) plain.push_back(trie.lowest_match(address));
    trie.finish();
    CHECK(trie.jump_entry_count() > 0);
    int matched = 0;
    for (std::size_t p = 0; p < probes.size(); ++p) {
        std::uint32_t scan = PrefixTrie::npos;
        for (std::uint32_t i = 0; i < networks.size(); ++i) {
            if (networks[i].contains(probes[p])) {
                scan = i;
                break;
            }
        }
        CHECK(trie.lowest_match(probes[p]) == scan);
        CHECK(plain[p] == scan);
        matched += scan != PrefixTrie::npos;
    }
    CHECK(matched > 2500);
    trie.insert(networks.front(), 20000);  // an insert drops the jump tables
    CHECK(trie.jump_entry_count() == 0);
    CHECK(trie.lowest_match(networks.front().address) == 0);

    // The same through a cidr: table file, with results and an if-block (the walk that
    // visits every stored prefix).
    TempDir dir;
    std::string file;
    for (std::size_t i = 0; i < 3000; ++i)
        file += networks[i].to_string() + " r" + std::to_string(i) + "\n";
    const std::string plain_path = dir.write("dense.cidr", file);
    const std::string if_path = dir.write("dense-if.cidr", "if 10.0.0.0/15\n" + file + "endif\n");
    const auto table = open_ok("cidr:" + plain_path, KeyKind::ip);
    const auto with_if = open_ok("cidr:" + if_path, KeyKind::ip);
    for (std::size_t p = 0; p < 2000; ++p) {
        const std::string key = IpAddress(probes[p]).to_string();
        std::string expected = "-";
        std::string expected_if = "-";
        for (std::size_t i = 0; i < 3000; ++i) {
            if (!networks[i].contains(probes[p])) continue;
            expected = "r" + std::to_string(i) + "@" + plain_path + ":" + std::to_string(i + 1);
            if (IpNetwork{*parse_ip_address("10.0.0.0"), 15}.contains(probes[p])) {
                expected_if = "r" + std::to_string(i) + "@" + if_path + ":" + std::to_string(i + 2);
            }
            break;
        }
        CAPTURE(key);
        CHECK(find(*table, key) == expected);
        CHECK(find(*with_if, key) == expected_if);
    }
}

TEST_CASE("texthash: a big table finds every key, in any case, and no other") {
    TempDir dir;
    std::string file = "# generated\n";
    for (int i = 0; i < 5000; ++i) {
        file += "Scanner-" + std::to_string(i) + ".Site" + std::to_string(i % 40) +
                ".contoso.test r" + std::to_string(i) + "\n";
    }
    const std::string path = dir.write("subjects", file);
    const auto table = open_ok("texthash:" + path, KeyKind::text);
    for (int i = 0; i < 5000; ++i) {
        const std::string key =
            "scanner-" + std::to_string(i) + ".site" + std::to_string(i % 40) + ".contoso.test";
        const std::string expected =
            "r" + std::to_string(i) + "@" + path + ":" + std::to_string(i + 2);
        REQUIRE(find(*table, key) == expected);
        std::string upper = key;
        for (char& c : upper) c = static_cast<char>(std::toupper(c));
        REQUIRE(find(*table, upper) == expected);
        REQUIRE(find(*table, key + "x") == "-");
        REQUIRE(find(*table, key.substr(1)) == "-");
    }
    CHECK(find(*table, "") == "-");
    // A key longer than the lookup's stack buffer.
    const std::string long_key(300, 'k');
    const auto long_table =
        open_ok("texthash:" + dir.write("long", long_key + " long\n"), KeyKind::text);
    CHECK(find(*long_table, std::string(300, 'K')).starts_with("long@"));
    CHECK(find(*long_table, std::string(299, 'k')) == "-");
    // Duplicates are still refused, with the first occurrence named.
    CHECK(open_error("texthash:" + dir.write("dup", file + "SCANNER-7.site7.contoso.test x\n"),
                     KeyKind::text) == dir.path() +
                                           "/dup:5002: duplicate key "
                                           "\"scanner-7.site7.contoso.test\" (first "
                                           "at " +
                                           dir.path() + "/dup:9)");
}
