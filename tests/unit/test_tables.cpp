#include <doctest/doctest.h>

#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

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
