#include <doctest/doctest.h>

#include <string>

#include "paasmilter/classifier.hpp"
#include "paasmilter/xtext.hpp"

using namespace paasmilter;

// What Sendmail 8.17 sent in tests/sendmail/ (tls.c xtextify()): spaces and other bytes
// outside "!".."~" as +XX, "=" and "/" as they are.
TEST_CASE("decode_xtext: Sendmail's certificate macros") {
    CHECK(decode_xtext("/O=Contoso+20Ltd/CN=scanner-7.contoso.test") ==
          "/O=Contoso Ltd/CN=scanner-7.contoso.test");
    CHECK(decode_xtext("/CN=Test+20CA") == "/CN=Test CA");
    CHECK(common_name_from_dn(decode_xtext("/O=Contoso+20Ltd/CN=Printer+2042")) == "Printer 42");
    // "+" itself, and UTF-8 (bytes above "~") as Sendmail writes them
    CHECK(decode_xtext("/CN=a+2Bb") == "/CN=a+b");
    CHECK(decode_xtext("/CN=R+C3+A9sum+C3+A9") == "/CN=R\xC3\xA9sum\xC3\xA9");
    CHECK(decode_xtext("+3c+3E") == "<>");  // lower-case hex is accepted too
}

TEST_CASE("decode_xtext: text that is not xtext comes back unchanged") {
    CHECK(decode_xtext("") == "");
    CHECK(decode_xtext("printer-42.contoso.test") == "printer-42.contoso.test");
    CHECK(decode_xtext("/O=Contoso/CN=x") == "/O=Contoso/CN=x");
    CHECK(decode_xtext("a+") == "a+");
    CHECK(decode_xtext("a+2") == "a+2");
    CHECK(decode_xtext("a+G0b") == "a+G0b");
    CHECK(decode_xtext("+2") == "+2");
    CHECK(decode_xtext("++41") == "+A");
}
