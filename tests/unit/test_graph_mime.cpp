#include <doctest/doctest.h>
#include <glib.h>
#include <gmime/gmime.h>

#include <algorithm>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "paasmilter/providers/graph_mime.hpp"
#include "paasmilter/spool.hpp"
#include "temp_dir.hpp"

using namespace paasmilter;
using namespace paasmilter::graph;

namespace {

// Test messages are written with "\n"; the milter spools CRLF.
std::string crlf(std::string_view text) {
    std::string out;
    for (char c : text) {
        if (c == '\n') out += '\r';
        out += c;
    }
    return out;
}

GraphMimeOptions routing_options() {
    GraphMimeOptions options;
    options.never_pass_headers = {"X-PaaS-Route", "X-Internal-Secret"};
    return options;
}

GraphMime prepared(std::string_view source, const std::vector<std::string>& recipients,
                   const GraphMimeOptions& options = routing_options()) {
    auto result = prepare_graph_mime(source, recipients, options);
    REQUIRE_MESSAGE(result.ok(), result.error().to_string());
    return std::move(result).value();
}

struct GObjectUnref {
    void operator()(gpointer object) const {
        if (object) g_object_unref(object);
    }
};
template <class T>
using GObjectPtr = std::unique_ptr<T, GObjectUnref>;

// How an independent reader (GMime's message parser, not the field splitter under test) sees
// the prepared message: every header field's name in order, and the addresses per field type.
struct ParsedView {
    std::vector<std::string> field_names;
    std::vector<std::string> to, cc, bcc;
};

void flatten(InternetAddressList* list, std::vector<std::string>& out) {
    for (int i = 0, n = list ? internet_address_list_length(list) : 0; i < n; ++i) {
        InternetAddress* address = internet_address_list_get_address(list, i);
        if (INTERNET_ADDRESS_IS_GROUP(address))
            flatten(internet_address_group_get_members(INTERNET_ADDRESS_GROUP(address)), out);
        else
            out.emplace_back(internet_address_mailbox_get_addr(INTERNET_ADDRESS_MAILBOX(address)));
    }
}

ParsedView parse_with_gmime(const std::string& mime) {
    GObjectPtr<GMimeStream> stream(g_mime_stream_mem_new_with_buffer(mime.data(), mime.size()));
    GObjectPtr<GMimeParser> parser(g_mime_parser_new_with_stream(stream.get()));
    GObjectPtr<GMimeMessage> message(g_mime_parser_construct_message(parser.get(), nullptr));
    REQUIRE(message);
    ParsedView view;
    GMimeHeaderList* headers = g_mime_object_get_header_list(GMIME_OBJECT(message.get()));
    for (int i = 0; i < g_mime_header_list_get_count(headers); ++i)
        view.field_names.emplace_back(
            g_mime_header_get_name(g_mime_header_list_get_header_at(headers, i)));
    flatten(g_mime_message_get_addresses(message.get(), GMIME_ADDRESS_TYPE_TO), view.to);
    flatten(g_mime_message_get_addresses(message.get(), GMIME_ADDRESS_TYPE_CC), view.cc);
    flatten(g_mime_message_get_addresses(message.get(), GMIME_ADDRESS_TYPE_BCC), view.bcc);
    return view;
}

using Names = std::vector<std::string>;

const std::string kBody = crlf(
    "--b1\n"
    "Content-Type: text/plain; charset=utf-8\n"
    "Content-Transfer-Encoding: 8bit\n"
    "\n"
    "Gr\xc3\xbc\xc3\x9f"
    "e,\n"
    "To: not-a-header@example.org\n"
    "\n"
    "\n"
    "--b1--\n");

}  // namespace

TEST_CASE("graph mime: a message whose recipients are all in To/Cc goes out byte for byte") {
    const std::string source = crlf(
                                   "Received: from printer (printer [192.0.2.7])\n"
                                   "\tby mx.contoso.com (Postfix) with ESMTP id 4AbCd\n"
                                   "From: Scanner <scanner@contoso.com>\n"
                                   "To: \"Doe, John\" <john@example.net>,\n"
                                   "  Alice <ALICE@example.net>\n"
                                   "Cc: bob@example.org\n"
                                   "Subject: Scan\n"
                                   "Message-ID: <scan-1@contoso.com>\n"
                                   "MIME-Version: 1.0\n"
                                   "Content-Type: multipart/mixed; boundary=b1\n"
                                   "\n") +
                               kBody;
    const GraphMime out =
        prepared(source, {"john@example.net", "<alice@EXAMPLE.net>", "bob@example.org"});
    CHECK(out.mime == source);
    CHECK(out.internet_message_id == "<scan-1@contoso.com>");
    CHECK(out.visible_recipients ==
          Names{"john@example.net", "alice@EXAMPLE.net", "bob@example.org"});
    CHECK(out.bcc_recipients.empty());
    CHECK(out.recipients() == out.visible_recipients);
}

TEST_CASE(
    "graph mime: never-pass fields go, in any case and wherever they are; nothing else moves") {
    const std::string head_before = crlf(
        "X-PaaS-Route: acs-api\n"
        "From: app@contoso.com\n");
    const std::string routed_twice = crlf(
        "x-paas-ROUTE: forged\n"
        "  and folded\n");
    const std::string middle = crlf(
        "To: a@example.net\n"
        "Subject: =?UTF-8?Q?Gr=C3=BC=C3=9Fe?= und\n"
        " mehr\n"
        "X-Device: Caf\xc3\xa9 \xe2\x98\x95 8-bit UTF-8 value\n");
    const std::string secret = crlf("X-Internal-Secret : s3cr3t\n");
    const std::string tail = crlf(
        "X-PaaS-Route-Info: a different field, kept\n"
        "Message-ID: <m@contoso.com>\n"
        "\n");
    const std::string source = head_before + routed_twice + middle + secret + tail + kBody;
    const GraphMime out = prepared(source, {"a@example.net"});
    const std::string expected = crlf("From: app@contoso.com\n") + middle + tail + kBody;
    CHECK(out.mime == expected);
    const ParsedView view = parse_with_gmime(out.mime);
    CHECK(view.field_names ==
          Names{"From", "To", "Subject", "X-Device", "X-PaaS-Route-Info", "Message-ID"});
}

TEST_CASE("graph mime: never-pass entries ending in '*' are prefixes") {
    GraphMimeOptions options;
    options.never_pass_headers = {"X-Internal-*"};
    const std::string source = crlf(
        "To: a@example.net\nX-Internal-One: 1\nX-Internalize: kept\nx-internal-two: 2\n\nbody\n");
    CHECK(prepared(source, {"a@example.net"}, options).mime ==
          crlf("To: a@example.net\nX-Internalize: kept\n\nbody\n"));
}

TEST_CASE("graph mime: a To with one address that is not an envelope recipient loses that one") {
    const std::string before = crlf("From: app@contoso.com\n");
    const std::string after = crlf(
        "Cc: \"Carol C.\" <carol@example.org>\n"
        "Subject: three in To\n"
        "\n");
    const std::string source =
        before +
        crlf(
            "To: \"Doe, John\" <john@example.net>, Local <local@contoso.test>,\n"
            " =?UTF-8?Q?J=C3=B6rg?= <joerg@example.net>\n") +
        after + kBody;
    const GraphMime out =
        prepared(source, {"joerg@example.net", "john@example.net", "carol@example.org"});
    // GMime renders what is left: display names kept (RFC 2047 where needed), quoted where
    // needed; every other byte is the input's.
    CHECK(out.mime == before +
                          crlf("To: \"Doe, John\" <john@example.net>, =?UTF-8?b?SsO2cmc=?= "
                               "<joerg@example.net>\n") +
                          after + kBody);
    CHECK(out.visible_recipients ==
          Names{"john@example.net", "joerg@example.net", "carol@example.org"});
    CHECK(out.bcc_recipients.empty());
    const ParsedView view = parse_with_gmime(out.mime);
    CHECK(view.to == Names{"john@example.net", "joerg@example.net"});
    CHECK(view.cc == Names{"carol@example.org"});
    CHECK(view.bcc.empty());
}

TEST_CASE("graph mime: envelope recipients missing from the headers go into one Bcc at the end") {
    const std::string headers = crlf(
        "From: app@contoso.com\n"
        "To: a@example.net\n"
        "Subject: hidden ones\n");
    const std::string source = headers + crlf("\n") + kBody;
    const GraphMime out =
        prepared(source, {"a@example.net", "hidden1@example.org", "<hidden2@example.com>"});
    CHECK(out.mime == headers + crlf("Bcc: hidden1@example.org, hidden2@example.com\n\n") + kBody);
    CHECK(out.visible_recipients == Names{"a@example.net"});
    CHECK(out.bcc_recipients == Names{"hidden1@example.org", "hidden2@example.com"});
    CHECK(out.recipients() == Names{"a@example.net", "hidden1@example.org", "hidden2@example.com"});
}

TEST_CASE("graph mime: the client's Bcc fields are replaced by one, where the first one was") {
    const std::string source = crlf(
        "From: app@contoso.com\n"
        "Bcc: Boss <boss@example.net>, notinenvelope@example.org\n"
        "To: a@example.net\n"
        "bcc: second@example.net\n"
        "Resent-Bcc: resent@example.net\n"
        "Subject: bcc\n"
        "\n"
        "body\n");
    const GraphMime out = prepared(source, {"a@example.net", "boss@example.net"});
    CHECK(out.mime == crlf("From: app@contoso.com\n"
                           "Bcc: boss@example.net\n"
                           "To: a@example.net\n"
                           "Subject: bcc\n"
                           "\n"
                           "body\n"));
    // Every Bcc goes, even when all recipients are shown.
    const GraphMime all_shown = prepared(source, {"a@example.net"});
    CHECK(all_shown.mime ==
          crlf("From: app@contoso.com\nTo: a@example.net\nSubject: bcc\n\nbody\n"));
    CHECK(all_shown.bcc_recipients.empty());
}

TEST_CASE("graph mime: group syntax keeps the group and its members that are recipients") {
    const std::string source = crlf(
        "From: app@contoso.com\n"
        "To: Team: a@example.net, \"B B\" <b@example.net>, c@example.net;, d@example.net\n"
        "Cc: Others: x@example.org, y@example.org;, e@example.net\n"
        "\n"
        "body\n");
    const GraphMime out =
        prepared(source, {"a@example.net", "c@example.net", "d@example.net", "e@example.net"});
    // A group that lost some members keeps the rest; one that lost all goes.
    CHECK(out.mime == crlf("From: app@contoso.com\n"
                           "To: Team: a@example.net, c@example.net;, d@example.net\n"
                           "Cc: e@example.net\n"
                           "\n"
                           "body\n"));
    CHECK(out.visible_recipients ==
          Names{"a@example.net", "c@example.net", "d@example.net", "e@example.net"});

    // An empty group is no recipient and nothing to remove: the field stays as written.
    const std::string undisclosed =
        crlf("From: app@contoso.com\nTo: undisclosed-recipients:;\n\nbody\n");
    const GraphMime hidden = prepared(undisclosed, {"a@example.net"});
    CHECK(hidden.mime == crlf("From: app@contoso.com\nTo: undisclosed-recipients:;\n"
                              "Bcc: a@example.net\n\nbody\n"));
}

TEST_CASE("graph mime: no To at all: only a Bcc is added") {
    const std::string source = crlf("From: app@contoso.com\nSubject: no To\n\nbody\n");
    const GraphMime out = prepared(source, {"a@example.net", "b@example.net"});
    CHECK(
        out.mime ==
        crlf("From: app@contoso.com\nSubject: no To\nBcc: a@example.net, b@example.net\n\nbody\n"));
    CHECK(out.visible_recipients.empty());
    CHECK(out.bcc_recipients == Names{"a@example.net", "b@example.net"});
}

TEST_CASE("graph mime: a To/Cc left empty goes, unless it was the last one showing anything") {
    SUBCASE("another field still shows recipients: the empty one is removed") {
        const std::string source =
            crlf("To: local@contoso.test\nCc: a@example.net\nSubject: s\n\nbody\n");
        CHECK(prepared(source, {"a@example.net"}).mime ==
              crlf("Cc: a@example.net\nSubject: s\n\nbody\n"));
    }
    SUBCASE("nothing else shows recipients: the first emptied field says they are hidden") {
        const std::string source = crlf(
            "cc: other@contoso.test\nTO: local@contoso.test,\n another@contoso.test\n"
            "Subject: s\n\nbody\n");
        const GraphMime out = prepared(source, {"a@example.net"});
        CHECK(out.mime == crlf("cc: undisclosed-recipients:;\nSubject: s\n"
                               "Bcc: a@example.net\n\nbody\n"));
        CHECK(out.bcc_recipients == Names{"a@example.net"});
    }
}

TEST_CASE("graph mime: Resent-To/Resent-Cc are narrowed but place nobody") {
    const std::string source = crlf(
        "Resent-To: a@example.net, outsider@example.org\nResent-Cc: outsider@example.org\n"
        "To: a@example.net\n\nbody\n");
    const GraphMime out = prepared(source, {"a@example.net"});
    CHECK(out.mime == crlf("Resent-To: a@example.net\nTo: a@example.net\n\nbody\n"));
    const GraphMime only_resent =
        prepared(crlf("Resent-To: a@example.net\n\nbody\n"), {"a@example.net"});
    CHECK(only_resent.mime == crlf("Resent-To: a@example.net\nBcc: a@example.net\n\nbody\n"));
}

TEST_CASE("graph mime: text GMime skips in an address field is never passed on verbatim") {
    // GMime stops reading at the ';' (and at "@@"): a parser that reads on would find
    // outsider@example.org. Every '@' not in an addr-spec GMime read makes the field rendered.
    const std::string semicolon = crlf("To: a@example.net; outsider@example.org\n\nbody\n");
    CHECK(prepared(semicolon, {"a@example.net"}).mime == crlf("To: a@example.net\n\nbody\n"));
    const std::string stray = crlf("To: a@example.net, @@ outsider@example.org\n\nbody\n");
    CHECK(prepared(stray, {"a@example.net"}).mime == crlf("To: a@example.net\n\nbody\n"));
    std::string with_nul = crlf("To: a@example.net, x\n\nbody\n");
    with_nul[with_nul.find(", x")] = '\0';
    CHECK(prepared(with_nul, {"a@example.net"}).mime == crlf("To: a@example.net\n\nbody\n"));
    // A comment or a display name with '@' is read too, but only addr-specs count: rendered,
    // with the same recipients.
    const std::string named = crlf("To: \"a@example.net\" <a@example.net>\n\nbody\n");
    const GraphMime out = prepared(named, {"a@example.net"});
    CHECK(out.mime == crlf("To: \"a@example.net\" <a@example.net>\n\nbody\n"));
}

TEST_CASE("graph mime: folded, obs-folded and 8-bit header fields keep their bytes") {
    const std::string source =
        crlf(
            "Subject: a folded\n"
            "\tsubject\n"
            "X-Obs-Fold: value\n"
            "   \n"
            "  continued after a blank-only line\n"
            "Comments : blank before the colon\n"
            "X-UTF8: \xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e \xf0\x9f\x93\xa0\n"
            "X-Latin1: caf\xe9\n"
            "From: =?ISO-8859-1?Q?J=F6rg?= <app@contoso.com>\n"
            "To: \xc3\x89l\xc3\xa8ve <eleve@example.net>, M\xc3\xbcller <mueller@example.net>\n"
            "not a header line\n"
            "\n") +
        kBody;
    const GraphMime out = prepared(source, {"eleve@example.net", "mueller@example.net"});
    CHECK(out.mime == source);
    CHECK_FALSE(out.internet_message_id);
}

TEST_CASE("graph mime: the body is never read as headers, whatever it contains") {
    const std::string source = crlf(
        "To: a@example.net\n"
        "\n"
        "X-PaaS-Route: in the body\n"
        "Bcc: in-body@example.org\n"
        "To: outsider@example.org\n");
    CHECK(prepared(source, {"a@example.net"}).mime == source);
}

TEST_CASE("graph mime: only a true empty line ends the header section") {
    // "\r\r\n" is no empty line for every reader: the fields after it are still fields here.
    const std::string source =
        "X-A: 1\r\n\r\r\nTo: a@example.net, outsider@example.org\r\n\r\nbody\r\n";
    CHECK(prepared(source, {"a@example.net"}).mime ==
          "X-A: 1\r\n\r\r\nTo: a@example.net\r\n\r\nbody\r\n");
}

TEST_CASE("graph mime: LF-only input keeps LF, and what is rendered ends in LF too") {
    const std::string source =
        "X-PaaS-Route: acs\n"
        "To: a@example.net, outsider@example.org\n"
        "Subject: lf\n"
        "\n"
        "line\n";
    const GraphMime out = prepared(source, {"a@example.net", "b@example.net"});
    CHECK(out.mime == "To: a@example.net\nSubject: lf\nBcc: b@example.net\n\nline\n");
}

TEST_CASE("graph mime: long rendered fields are folded by GMime with the input's line end") {
    std::vector<std::string> recipients;
    for (int i = 0; i < 8; ++i)
        recipients.push_back("recipient-number-" + std::to_string(i) + "@example.net");
    const GraphMime out = prepared(crlf("Subject: many\n\nbody\n"), recipients);
    const std::string header = out.mime.substr(0, out.mime.find("\r\n\r\n") + 2);
    CHECK(header.find("\r\n\t") != std::string::npos);
    CHECK(header.find('\n') == header.find("\r\n") + 1);
    for (size_t at = header.find('\n'); at != std::string::npos; at = header.find('\n', at + 1))
        CHECK(header[at - 1] == '\r');
    CHECK(parse_with_gmime(out.mime).bcc == recipients);
}

TEST_CASE("graph mime: a header section without a body, or without a final line end") {
    CHECK(prepared(crlf("To: a@example.net\n"), {"a@example.net", "b@example.net"}).mime ==
          crlf("To: a@example.net\nBcc: b@example.net\n"));
    CHECK(prepared("To: a@example.net", {"a@example.net", "b@example.net"}).mime ==
          crlf("To: a@example.net\nBcc: b@example.net\n"));
}

TEST_CASE("graph mime: Message-ID is the first one's msg-id, as GMime reads it") {
    CHECK(prepared(crlf("Message-ID:\n <x.1@contoso.com> (the id)\n\nb\n"), {"a@example.net"})
              .internet_message_id == "<x.1@contoso.com>");
    CHECK(prepared(crlf("message-id: <first@h>\nMessage-ID: <second@h>\n\nb\n"), {"a@example.net"})
              .internet_message_id == "<first@h>");
    CHECK_FALSE(prepared(crlf("Subject: none\n\nb\n"), {"a@example.net"}).internet_message_id);
    GraphMimeOptions drop_id = routing_options();
    drop_id.never_pass_headers.push_back("Message-ID");
    CHECK_FALSE(prepared(crlf("Message-ID: <gone@h>\n\nb\n"), {"a@example.net"}, drop_id)
                    .internet_message_id);
}

TEST_CASE("graph mime: envelope recipients compare case-insensitively, IDN in either form, once") {
    const std::string source = crlf(
        "To: User@Example.NET, j\xc3\xb6rg@xn--exmple-cua.com, <\"john doe\"@example.org>\n\nb\n");
    const GraphMime out = prepared(source, {"<user@example.net>", "j\xc3\xb6rg@ex\xc3\xa4mple.com",
                                            "\"john doe\"@example.org", "USER@example.net"});
    CHECK(out.mime == source);
    CHECK(out.visible_recipients ==
          Names{"user@example.net", "j\xc3\xb6rg@ex\xc3\xa4mple.com", "\"john doe\"@example.org"});
    CHECK(out.bcc_recipients.empty());
}

TEST_CASE("graph mime: errors are values") {
    auto none = prepare_graph_mime(crlf("To: a@example.net\n\nb\n"), {" ", "<>"}, {});
    REQUIRE_FALSE(none.ok());
    CHECK(none.error().message == "no envelope recipients");
    CHECK_FALSE(is_message_too_large(none.error()));

    GraphMimeOptions small;
    small.max_message_bytes = 30;
    auto large =
        prepare_graph_mime(crlf("To: a@example.net\n\n0123456789\n"), {"a@example.net"}, small);
    REQUIRE_FALSE(large.ok());
    CHECK(is_message_too_large(large.error()));
    CHECK(large.error().kind == ErrorKind::too_large);
    // The Bcc field can take the output over the limit.
    small.max_message_bytes = 31;
    auto grown = prepare_graph_mime(crlf("To: a@example.net\n\n0123456789\n"),
                                    {"a@example.net", "b@example.net"}, small);
    REQUIRE_FALSE(grown.ok());
    CHECK(is_message_too_large(grown.error()));
}

TEST_CASE("graph mime: base64 request body, standard alphabet, no line breaks") {
    CHECK(base64_encode_mime("") == "");
    CHECK(base64_encode_mime("f") == "Zg==");
    CHECK(base64_encode_mime("fo") == "Zm8=");
    CHECK(base64_encode_mime("foo") == "Zm9v");
    CHECK(base64_encode_mime("\xfb\xff\xfe") == "+//+");
    for (size_t size : {0u, 1u, 2u, 3u, 100u, 1000u})
        CHECK(base64_encode_mime(std::string(size, 'x')).size() == base64_size(size));

    std::mt19937 random(7);
    std::string message(100'003, '\0');
    for (char& c : message) c = static_cast<char>(random() & 0xff);
    const std::string whole = base64_encode_mime(message);
    CHECK(whole.size() == base64_size(message.size()));
    CHECK(whole.find_first_of("\r\n") == std::string::npos);
    // In chunks of any size, the same text.
    Base64Encoder encoder;
    std::string pieces;
    for (size_t at = 0; at < message.size();) {
        const size_t length = std::min<size_t>(1 + random() % 5000, message.size() - at);
        encoder.add(std::string_view(message).substr(at, length), pieces);
        at += length;
    }
    encoder.finish(pieces);
    CHECK(pieces == whole);
    gsize decoded_size = 0;
    std::unique_ptr<guchar, decltype(&g_free)> decoded(
        g_base64_decode(whole.c_str(), &decoded_size), &g_free);
    REQUIRE(decoded_size == message.size());
    CHECK(std::equal(message.begin(), message.end(), reinterpret_cast<const char*>(decoded.get())));
}

TEST_CASE("graph mime: a 5 MB message is over the single-request limit, 2 MB is not") {
    const std::string attachment_line = std::string(76, 'A') + "\r\n";
    std::string source = crlf(
        "To: a@example.net\nMIME-Version: 1.0\nContent-Type: application/pdf\n"
        "Content-Transfer-Encoding: base64\n\n");
    while (source.size() < 5 * 1000 * 1000) source += attachment_line;
    const GraphMime out = prepared(source, {"a@example.net"});
    CHECK(out.mime == source);
    CHECK(exceeds_graph_request_limit(out.mime.size()));
    CHECK(exceeds_graph_request_limit(2'000'000) == false);
    // 3,000,000 bytes of MIME are exactly 4,000,000 of base64: the limit itself still fits.
    CHECK_FALSE(exceeds_graph_request_limit(3'000'000));
    CHECK(exceeds_graph_request_limit(3'000'001));
    CHECK(exceeds_graph_request_limit(3'000'000, 3'999'999));
    CHECK_FALSE(exceeds_graph_request_limit(5'000'000, 10'000'000));
}

TEST_CASE("graph mime: a spooled message reads from the spool file as from memory") {
    paasmilter::testing::TempDir dir;
    std::string source = crlf(
        "X-PaaS-Route: acs\n"
        "From: app@contoso.com\n"
        "To: a@example.net, local@contoso.test\n"
        "Message-ID: <spooled@contoso.com>\n"
        "\n");
    for (int i = 0; i < 2000; ++i) source += "line " + std::to_string(i) + "\r\n";
    MessageSpool spool(64, dir.path().string(), 1 << 20);
    REQUIRE(spool.append(source).ok());
    REQUIRE_FALSE(spool.in_memory());

    const std::vector<std::string> recipients{"a@example.net", "b@example.net"};
    const GraphMime from_memory = prepared(source, recipients);
    auto from_file = prepare_graph_mime_fd(spool.fd(), recipients, routing_options());
    REQUIRE_MESSAGE(from_file.ok(), from_file.error().to_string());
    CHECK(from_file->mime == from_memory.mime);
    CHECK(from_file->internet_message_id == from_memory.internet_message_id);
    CHECK(from_file->recipients() == from_memory.recipients());
    CHECK(from_memory.mime.starts_with(
        crlf("From: app@contoso.com\nTo: a@example.net\nMessage-ID: <spooled@contoso.com>\n"
             "Bcc: b@example.net\n\nline 0\n")));

    // The file's size is checked before it is read.
    GraphMimeOptions small = routing_options();
    small.max_message_bytes = 100;
    auto refused = prepare_graph_mime_fd(spool.fd(), recipients, small);
    REQUIRE_FALSE(refused.ok());
    CHECK(is_message_too_large(refused.error()));
    CHECK_FALSE(prepare_graph_mime_fd(-1, recipients, routing_options()).ok());
}

TEST_CASE("graph mime: what GMime reads from a prepared message is the envelope, exactly") {
    const std::string source =
        crlf(
            "From: app@contoso.com\n"
            "To: Team: a@example.net, outsider@example.org;, \"X\" <b@example.net>\n"
            "Cc: outsider2@example.org, C <c@example.net>\n"
            "Bcc: d@example.net, outsider3@example.org\n"
            "Subject: check\n"
            "\n") +
        kBody;
    const std::vector<std::string> envelope{"a@example.net", "b@example.net", "c@example.net",
                                            "d@example.net", "e@example.net"};
    const GraphMime out = prepared(source, envelope);
    const ParsedView view = parse_with_gmime(out.mime);
    CHECK(view.to == Names{"a@example.net", "b@example.net"});
    CHECK(view.cc == Names{"c@example.net"});
    CHECK(view.bcc == Names{"d@example.net", "e@example.net"});
    CHECK(view.field_names == Names{"From", "To", "Cc", "Bcc", "Subject"});
    Names all = out.recipients();
    std::sort(all.begin(), all.end());
    CHECK(all == envelope);
    CHECK(out.mime.ends_with(crlf("Subject: check\n\n") + kBody));
}

// ---- detaching large attachments ----

namespace {

std::string base64_lines(const std::string& bytes) {
    const std::string encoded = base64_encode_mime(bytes);
    std::string out;
    for (size_t at = 0; at < encoded.size(); at += 76) out += encoded.substr(at, 76) + "\r\n";
    return out;
}

std::string pattern_bytes(size_t size, unsigned seed) {
    std::mt19937 random(seed);
    std::string out(size, '\0');
    for (char& c : out) c = static_cast<char>(random() & 0xff);
    return out;
}

}  // namespace

TEST_CASE("graph mime: large attachments are detached, the rest stays") {
    const std::string large = pattern_bytes(5000, 1);
    const std::string small = pattern_bytes(100, 2);
    const std::string image = pattern_bytes(4000, 3);
    const std::string source =
        crlf(
            "From: app@contoso.com\nTo: a@example.net\nSubject: attachments\nMIME-Version: 1.0\n"
            "Content-Type: multipart/mixed; boundary=outer\n\n"
            "--outer\nContent-Type: multipart/related; boundary=inner\n\n"
            "--inner\nContent-Type: text/html; charset=utf-8\n\n<img src=\"cid:img1\">\n"
            "--inner\nContent-Type: image/png\nContent-ID: <img1>\n"
            "Content-Disposition: inline\nContent-Transfer-Encoding: base64\n\n") +
        base64_lines(image) +
        crlf(
            "--inner--\n"
            "--outer\nContent-Type: application/pdf; name=\"big.pdf\"\n"
            "Content-Disposition: attachment; filename*=UTF-8''gro%C3%9F.pdf\n"
            "Content-Transfer-Encoding: base64\n\n") +
        base64_lines(large) +
        crlf(
            "--outer\nContent-Type: application/octet-stream\n"
            "Content-Disposition: attachment; filename=small.bin\n"
            "Content-Transfer-Encoding: base64\n\n") +
        base64_lines(small) + crlf("--outer--\n");

    auto detached = detach_large_attachments(source, 3000);
    REQUIRE_MESSAGE(detached.ok(), detached.error().to_string());
    REQUIRE(detached->attachments.size() == 2);
    const DetachedAttachment& first = detached->attachments[0];
    CHECK(first.content_type == "image/png");
    CHECK(first.content_id == "img1");
    CHECK(first.is_inline);
    CHECK(first.file_name.empty());
    CHECK(first.bytes == image);
    const DetachedAttachment& second = detached->attachments[1];
    CHECK(second.content_type == "application/pdf");
    CHECK(second.file_name == "gro\xc3\x9f.pdf");
    CHECK_FALSE(second.is_inline);
    CHECK(second.bytes == large);

    const std::string& rest = detached->mime;
    CHECK(rest.size() < source.size() - 10000);
    CHECK(
        rest.starts_with(crlf("From: app@contoso.com\nTo: a@example.net\nSubject: attachments\n")));
    CHECK(rest.find(crlf("<img src=\"cid:img1\">\n--inner--\n")) != std::string::npos);
    CHECK(rest.find(base64_lines(small)) != std::string::npos);
    CHECK(rest.find("big.pdf") == std::string::npos);

    // Nothing over the threshold: nothing detached, and the input comes back byte for byte.
    auto nothing = detach_large_attachments(source, 10000);
    REQUIRE(nothing.ok());
    CHECK(nothing->attachments.empty());
    CHECK(nothing->mime == source);
}

TEST_CASE("graph mime: detaching never leaves an empty multipart or an empty message") {
    const std::string pdf = pattern_bytes(6000, 4);
    const std::string only_child =
        crlf(
            "To: a@example.net\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=m\n\n"
            "--m\nContent-Type: application/pdf\nContent-Transfer-Encoding: base64\n\n") +
        base64_lines(pdf) + crlf("--m--\n");
    auto from_multipart = detach_large_attachments(only_child, 1000);
    REQUIRE(from_multipart.ok());
    REQUIRE(from_multipart->attachments.size() == 1);
    CHECK(from_multipart->attachments[0].bytes == pdf);
    CHECK(from_multipart->mime.find("Content-Type: text/plain") != std::string::npos);
    CHECK(from_multipart->mime.find("--m--") != std::string::npos);

    const std::string whole_body =
        crlf(
            "To: a@example.net\nMIME-Version: 1.0\nContent-Type: application/pdf\n"
            "Content-Transfer-Encoding: base64\n\n") +
        base64_lines(pdf);
    auto from_root = detach_large_attachments(whole_body, 1000);
    REQUIRE(from_root.ok());
    REQUIRE(from_root->attachments.size() == 1);
    CHECK(from_root->attachments[0].content_type == "application/pdf");
    CHECK(from_root->attachments[0].bytes == pdf);
    CHECK(from_root->mime.starts_with(crlf("To: a@example.net\n")));
    CHECK(from_root->mime.find("application/pdf") == std::string::npos);
    CHECK(from_root->mime.find("text/plain") != std::string::npos);
}

TEST_CASE("graph mime: the message text and signed parts are never detached") {
    const std::string text(5000, 't');
    const std::string source =
        crlf(
            "To: a@example.net\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=m\n\n"
            "--m\nContent-Type: text/plain\n\n") +
        text +
        crlf(
            "\n--m\nContent-Type: multipart/signed; boundary=s; "
            "protocol=\"application/pkcs7-signature\"\n\n"
            "--s\nContent-Type: application/octet-stream\n\n") +
        std::string(5000, 'x') +
        crlf("\n--s\nContent-Type: application/pkcs7-signature\n\nsig\n--s--\n--m--\n");
    auto detached = detach_large_attachments(source, 1000);
    REQUIRE(detached.ok());
    CHECK(detached->attachments.empty());
    CHECK(detached->mime == source);
}
