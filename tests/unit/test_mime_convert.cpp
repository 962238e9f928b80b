#include <doctest/doctest.h>
#include <glib.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "paasmilter/acs_json.hpp"
#include "paasmilter/mime_convert.hpp"
#include "temp_dir.hpp"

using namespace paasmilter;
using nlohmann::json;

namespace {

const std::filesystem::path kCorpus = std::filesystem::path(PAAS_TEST_DATA_DIR) / "mime";

std::string read_file(const std::filesystem::path& path) {
    std::ifstream in(path, std::ios::binary);
    REQUIRE_MESSAGE(in.good(), "cannot read ", path.string());
    std::ostringstream out;
    out << in.rdbuf();
    return out.str();
}

ConversionOptions base_options() {
    ConversionOptions options;
    options.sender = "DoNotReply@contoso.azurecomm.net";
    options.verified_domains = {"contoso.com"};
    options.never_pass_headers = {"X-PaaS-Route"};
    return options;
}

// A corpus message: NAME.eml, NAME.env ("from: ADDR", "rcpt: ADDR", "inline_attachments: true",
// "sender_source: envelope" lines), NAME.expected.json.
struct CorpusCase {
    std::string name;
    std::filesystem::path eml;
    Envelope envelope;
    ConversionOptions options;
    json expected;
};

std::vector<CorpusCase> load_corpus() {
    std::vector<CorpusCase> cases;
    for (const auto& entry : std::filesystem::directory_iterator(kCorpus)) {
        if (entry.path().extension() != ".eml") continue;
        CorpusCase item;
        item.name = entry.path().stem().string();
        item.eml = entry.path();
        item.options = base_options();
        std::istringstream env(read_file(kCorpus / (item.name + ".env")));
        for (std::string line; std::getline(env, line);) {
            const auto colon = line.find(": ");
            REQUIRE_MESSAGE(colon != std::string::npos, item.name, ".env: ", line);
            const std::string key = line.substr(0, colon), value = line.substr(colon + 2);
            if (key == "from")
                item.envelope.sender = value;
            else if (key == "rcpt")
                item.envelope.recipients.push_back(value);
            else if (key == "inline_attachments")
                item.options.inline_attachments = value == "true";
            else if (key == "sender_source")
                item.options.sender_source =
                    value == "envelope" ? SenderSource::envelope : SenderSource::header;
            else
                FAIL("unknown key in ", item.name, ".env: ", key);
        }
        item.expected = json::parse(read_file(kCorpus / (item.name + ".expected.json")));
        cases.push_back(std::move(item));
    }
    std::sort(cases.begin(), cases.end(),
              [](const CorpusCase& a, const CorpusCase& b) { return a.name < b.name; });
    return cases;
}

EmailMessage convert_ok(const std::string& source, const Envelope& envelope,
                        const ConversionOptions& options = base_options()) {
    auto result = convert_message(source, envelope, options);
    REQUIRE_MESSAGE(result.ok(), (result.ok() ? "" : result.error().to_string()));
    return std::move(result).value();
}

Envelope envelope(std::vector<std::string> recipients, std::string sender = "app@contoso.com") {
    return Envelope{std::move(sender), std::move(recipients)};
}

std::string message_with(const std::string& headers, const std::string& body = "Body.\n") {
    return headers + "MIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\n\n" + body;
}

std::vector<std::string> addresses(const std::vector<EmailAddress>& list) {
    std::vector<std::string> out;
    for (const auto& address : list) out.push_back(address.address);
    return out;
}

// Bare LFs to CRLF (line ends already CRLF stay as they are).
std::string crlf(const std::string& text) {
    std::string out;
    for (size_t i = 0; i < text.size(); ++i) {
        if (text[i] == '\n' && (i == 0 || text[i - 1] != '\r')) out += '\r';
        out += text[i];
    }
    return out;
}

}  // namespace

TEST_CASE("corpus: each message converts to its expected ACS request") {
    const auto cases = load_corpus();
    REQUIRE(cases.size() >= 14);
    for (const auto& item : cases) {
        CAPTURE(item.name);
        const std::string source = read_file(item.eml);
        auto from_memory = convert_message(source, item.envelope, item.options);
        REQUIRE_MESSAGE(from_memory.ok(), item.name, ": ",
                        (from_memory.ok() ? "" : from_memory.error().to_string()));
        const json actual = json::parse(to_acs_json(*from_memory));
        CHECK_MESSAGE(actual == item.expected, item.name, " got:\n", actual.dump(2));

        auto from_file = convert_message_file(item.eml.string(), item.envelope, item.options);
        REQUIRE(from_file.ok());
        CHECK_MESSAGE(to_acs_json(*from_file) == to_acs_json(*from_memory), item.name);
    }
}

TEST_CASE("corpus: CRLF line ends give the same result") {
    // Postfix hands the milter CRLF. Text bodies are normalised to LF; attachments are bytes as
    // sent, so a message with a 7bit text attachment differs.
    const std::vector<std::string> byte_exact = {"signed-calendar"};
    for (const auto& item : load_corpus()) {
        if (std::find(byte_exact.begin(), byte_exact.end(), item.name) != byte_exact.end())
            continue;
        CAPTURE(item.name);
        auto result = convert_message(crlf(read_file(item.eml)), item.envelope, item.options);
        REQUIRE(result.ok());
        const json actual = json::parse(to_acs_json(*result));
        CHECK_MESSAGE(actual == item.expected, item.name, " got:\n", actual.dump(2));
    }
}

TEST_CASE("corpus: 8 threads converting concurrently agree with the expected results") {
    const auto cases = load_corpus();
    std::vector<std::string> sources;
    for (const auto& item : cases) sources.push_back(read_file(item.eml));
    std::atomic<int> mismatches{0};
    std::atomic<int> conversions{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < 8; ++t) {
        threads.emplace_back([&, t] {
            for (int round = 0; round < 25; ++round) {
                for (size_t i = 0; i < cases.size(); ++i) {
                    const size_t k = (i + static_cast<size_t>(t)) % cases.size();
                    auto result =
                        (round % 2)
                            ? convert_message_file(cases[k].eml.string(), cases[k].envelope,
                                                   cases[k].options)
                            : convert_message(sources[k], cases[k].envelope, cases[k].options);
                    if (!result.ok() || json::parse(to_acs_json(*result)) != cases[k].expected)
                        ++mismatches;
                    ++conversions;
                }
            }
        });
    }
    for (auto& thread : threads) thread.join();
    CHECK(mismatches == 0);
    CHECK(conversions == static_cast<int>(8 * 25 * cases.size()));
}

TEST_CASE("recipients: the envelope decides, the headers only place") {
    const std::string source = message_with(
        "From: app@contoso.com\n"
        "To: \"Alice A.\" <ALICE@example.net>, header-only@example.net\n"
        "Cc: Bob <bob@example.net>, alice@example.net\n");
    const auto message =
        convert_ok(source, envelope({"<alice@example.net>", "bob@example.net", "dave@example.org",
                                     "Dave@Example.org", " "}));
    REQUIRE(message.to.size() == 1);
    CHECK(message.to[0].address == "alice@example.net");  // the envelope's spelling
    CHECK(message.to[0].display_name == "Alice A.");
    REQUIRE(message.cc.size() == 1);  // alice is not repeated in cc
    CHECK(message.cc[0].address == "bob@example.net");
    CHECK(message.cc[0].display_name == "Bob");
    CHECK(addresses(message.bcc) == std::vector<std::string>{"dave@example.org"});  // deduplicated
    CHECK(message.recipient_count() == 3);  // header-only@ is not sent to
}

TEST_CASE("recipients: group syntax and undisclosed-recipients") {
    auto message = convert_ok(message_with("From: app@contoso.com\nTo: undisclosed-recipients:;\n"),
                              envelope({"a@example.net", "b@example.net"}));
    CHECK(message.to.empty());
    CHECK(addresses(message.bcc) == std::vector<std::string>{"a@example.net", "b@example.net"});

    message = convert_ok(
        message_with("From: app@contoso.com\nTo: Team: \"A\" <a@example.net>, b@example.net;, "
                     "c@example.net\nCc: Others:;\n"),
        envelope({"c@example.net", "b@example.net", "a@example.net"}));
    CHECK(addresses(message.to) ==
          std::vector<std::string>{"a@example.net", "b@example.net", "c@example.net"});
    CHECK(message.to[0].display_name == "A");
    CHECK(message.bcc.empty());
}

TEST_CASE("recipients: no envelope recipient is an error") {
    auto result = convert_message(message_with("From: app@contoso.com\nTo: a@example.net\n"),
                                  envelope({}), base_options());
    REQUIRE_FALSE(result.ok());
    CHECK(result.error().message.find("recipient") != std::string::npos);
}

TEST_CASE("recipients: RFC 2047 display names in any charset") {
    const auto message = convert_ok(
        message_with("From: app@contoso.com\n"
                     "To: =?ISO-8859-1?Q?Fran=E7oise?= <f@example.net>, "
                     "=?Shift_JIS?B?jlKTY5G+mFk=?= <y@example.jp>, "
                     "=?UTF-8?B?/w==?= <bad@example.net>, =?x-unknown?Q?Zo=EB?= <z@example.net>\n"),
        envelope({"f@example.net", "y@example.jp", "bad@example.net", "z@example.net"}));
    REQUIRE(message.to.size() == 4);
    CHECK(message.to[0].display_name == "Françoise");
    CHECK(message.to[1].display_name == "山田太郎");
    for (const auto& address : message.to)
        CHECK(g_utf8_validate(address.display_name.data(),
                              static_cast<gssize>(address.display_name.size()), nullptr));
}

TEST_CASE("sender: a verified domain is kept, with the message's Reply-To") {
    auto message = convert_ok(message_with("From: \"App\" <App@Contoso.COM>\nTo: a@example.net\n"),
                              envelope({"a@example.net"}));
    CHECK(message.sender_address == "App@Contoso.COM");
    CHECK(message.reply_to.empty());

    message = convert_ok(message_with("From: app@contoso.com\nReply-To: Desk <desk@example.org>\n"
                                      "To: a@example.net\n"),
                         envelope({"a@example.net"}));
    CHECK(message.sender_address == "app@contoso.com");
    REQUIRE(message.reply_to.size() == 1);
    CHECK(message.reply_to[0].address == "desk@example.org");
    CHECK(message.reply_to[0].display_name == "Desk");
}

TEST_CASE("sender: an unverified one is replaced, the original becomes Reply-To") {
    auto message = convert_ok(
        message_with("From: \"MFP 3rd floor\" <scan@printers.local>\nSender: x@contoso.com\n"
                     "To: a@example.net\n"),
        envelope({"a@example.net"}, "scan@printers.local"));
    CHECK(message.sender_address == "DoNotReply@contoso.azurecomm.net");  // Sender: not used
    REQUIRE(message.reply_to.size() == 1);
    CHECK(message.reply_to[0].address == "scan@printers.local");
    CHECK(message.reply_to[0].display_name == "MFP 3rd floor");

    // Subdomains are not verified by their parent.
    message = convert_ok(message_with("From: app@mail.contoso.com\nTo: a@example.net\n"),
                         envelope({"a@example.net"}));
    CHECK(message.sender_address == "DoNotReply@contoso.azurecomm.net");

    // An existing Reply-To wins over the From.
    message = convert_ok(message_with("From: scan@printers.local\nReply-To: a@x.org, b@x.org\n"
                                      "To: a@example.net\n"),
                         envelope({"a@example.net"}));
    CHECK(addresses(message.reply_to) == std::vector<std::string>{"a@x.org", "b@x.org"});

    ConversionOptions no_reply = base_options();
    no_reply.reply_to_original = false;
    message = convert_ok(message_with("From: scan@printers.local\nTo: a@example.net\n"),
                         envelope({"a@example.net"}), no_reply);
    CHECK(message.reply_to.empty());
}

TEST_CASE("sender: the envelope sender as the source") {
    ConversionOptions options = base_options();
    options.sender_source = SenderSource::envelope;
    const std::string source =
        message_with("From: Printer <printer@printers.local>\nTo: a@example.net\n");

    auto message = convert_ok(source, envelope({"a@example.net"}, "<bounce@contoso.com>"), options);
    CHECK(message.sender_address == "bounce@contoso.com");
    CHECK(message.reply_to.empty());

    message = convert_ok(source, envelope({"a@example.net"}, "bounce@elsewhere.example"), options);
    CHECK(message.sender_address == "DoNotReply@contoso.azurecomm.net");
    REQUIRE(message.reply_to.size() == 1);
    CHECK(message.reply_to[0].address == "printer@printers.local");
    CHECK(message.reply_to[0].display_name == "Printer");

    // The null sender (bounces, notifications): the configured sender.
    message = convert_ok(source, envelope({"a@example.net"}, ""), options);
    CHECK(message.sender_address == "DoNotReply@contoso.azurecomm.net");
}

TEST_CASE("sender: no verified original and no configured sender is an error") {
    ConversionOptions options = base_options();
    options.sender.clear();
    auto result = convert_message(message_with("From: scan@printers.local\nTo: a@example.net\n"),
                                  envelope({"a@example.net"}), options);
    REQUIRE_FALSE(result.ok());
    CHECK(result.error().message.find("scan@printers.local") != std::string::npos);

    result =
        convert_message(message_with("To: a@example.net\n"), envelope({"a@example.net"}), options);
    CHECK_FALSE(result.ok());  // no From at all
}

TEST_CASE("headers: allow-list, built-in deny-list, unfolding, duplicates") {
    const std::string headers =
        "Received: from x by y\n"
        "DKIM-Signature: v=1\n"
        "ARC-Seal: i=1\n"
        "Authentication-Results: mx; spf=pass\n"
        "From: app@contoso.com\n"
        "To: a@example.net\n"
        "Subject: s\n"
        "Message-ID: <1@contoso.com>\n"
        "message-id: <2@contoso.com>\n"
        "In-Reply-To: <0@contoso.com>\n"
        "References: <a@contoso.com>\n <b@contoso.com>\n"
        "X-Folded:   first\n\tsecond  \n"
        "X-PaaS-Route: acs-api\n"
        "x-ms-acsemail-suppress-invalid-attachment: true\n"
        "X-Empty:\n"
        "Keywords: k\n"
        "Delivered-To: a@example.net\n"
        "X-Original-To: a@example.net\n";
    auto message = convert_ok(message_with(headers), envelope({"a@example.net"}));
    CHECK(message.headers == std::vector<std::pair<std::string, std::string>>{
                                 {"Message-ID", "<1@contoso.com>"},
                                 {"In-Reply-To", "<0@contoso.com>"},
                                 {"References", "<a@contoso.com> <b@contoso.com>"},
                                 {"X-Folded", "first\tsecond"},
                             });

    // Even "everything" never passes the built-in list.
    ConversionOptions everything = base_options();
    everything.pass_headers = {"*"};
    everything.never_pass_headers = {"X-PaaS-*", "keywords"};
    message = convert_ok(message_with(headers), envelope({"a@example.net"}), everything);
    std::vector<std::string> names;
    for (const auto& [name, value] : message.headers) names.push_back(name);
    CHECK(names == std::vector<std::string>{"Message-ID", "In-Reply-To", "References", "X-Folded"});

    ConversionOptions exact = base_options();
    exact.pass_headers = {"keywords", "x-folded"};
    message = convert_ok(message_with(headers), envelope({"a@example.net"}), exact);
    CHECK(message.headers == std::vector<std::pair<std::string, std::string>>{
                                 {"X-Folded", "first\tsecond"}, {"Keywords", "k"}});
}

TEST_CASE("headers: values with invalid bytes, control characters or NUL are dropped") {
    const std::string source = message_with(
        std::string("From: app@contoso.com\nTo: a@example.net\nX-Latin: caf\xe9\nX-Ctl: a\x01"
                    "b\n") +
        std::string("X-Nul: a\0b\n", 11) + "X-Utf8: caf\xc3\xa9\n");
    const auto message = convert_ok(source, envelope({"a@example.net"}));
    CHECK(message.headers ==
          std::vector<std::pair<std::string, std::string>>{{"X-Utf8", "caf\xc3\xa9"}});
}

TEST_CASE("attachments: cid-referenced parts are inline only when the option says so") {
    const std::string source = read_file(kCorpus / "related-cid.eml");
    ConversionOptions options = base_options();

    options.inline_attachments = true;
    auto message = convert_ok(source, envelope({"alice@example.net"}), options);
    REQUIRE(message.attachments.size() == 2);
    CHECK(message.attachments[0].content_id == "logo@contoso.com");
    CHECK(message.attachments[1].content_id.empty());  // has a Content-ID nobody references

    options.inline_attachments = false;
    message = convert_ok(source, envelope({"alice@example.net"}), options);
    REQUIRE(message.attachments.size() == 2);
    CHECK(message.attachments[0].content_id.empty());
    CHECK(message.attachments[0].name == "logo.png");
    CHECK(message.attachments[0].size == 33);
}

TEST_CASE("attachments: a repeated Content-ID stays inline only once (ACS rejects duplicates)") {
    const std::string source =
        "From: app@contoso.com\nTo: a@example.net\nMIME-Version: 1.0\n"
        "Content-Type: multipart/related; boundary=r\n\n"
        "--r\nContent-Type: text/html\n\n<img src=\"cid:img%40x\"><img src=\"cid:img@x\">\n"
        "--r\nContent-Type: image/png\nContent-ID: <img@x>\nContent-Transfer-Encoding: base64\n\n"
        "AAAA\n"
        "--r\nContent-Type: image/png\nContent-ID: <IMG@x>\nContent-Transfer-Encoding: base64\n\n"
        "AAAA\n--r--\n";
    ConversionOptions options = base_options();
    options.inline_attachments = true;
    const auto message = convert_ok(source, envelope({"a@example.net"}), options);
    REQUIRE(message.attachments.size() == 2);
    CHECK(message.attachments[0].content_id == "img@x");
    CHECK(message.attachments[1].content_id.empty());
    CHECK(message.attachments[0].name == "attachment-1.png");
    CHECK(message.attachments[1].name == "attachment-2.png");
    CHECK(message.attachments[0].content_base64 == "AAAA");
    CHECK(message.attachments[0].size == 3);
}
namespace {

std::string reference_base64(const std::string& bytes) {
    gchar* encoded = g_base64_encode(reinterpret_cast<const guchar*>(bytes.data()), bytes.size());
    std::string out(encoded);
    g_free(encoded);
    return out;
}

// Base64 in lines of `width` characters.
std::string base64_lines(const std::string& bytes, size_t width) {
    const std::string flat = reference_base64(bytes);
    std::string out;
    for (size_t i = 0; i < flat.size(); i += width) out += flat.substr(i, width) + "\n";
    return out;
}

// Every byte as =XX, soft line breaks every 24 bytes.
std::string quoted_printable(const std::string& bytes) {
    std::string out;
    for (size_t i = 0; i < bytes.size(); ++i) {
        char hex[4];
        std::snprintf(hex, sizeof hex, "=%02X", static_cast<unsigned char>(bytes[i]));
        out += hex;
        if (i % 24 == 23) out += "=\n";
    }
    return out + "\n";
}

std::string uuencode(const std::string& bytes) {
    auto digit = [](unsigned value) { return value == 0 ? '`' : static_cast<char>(32 + value); };
    std::string out = "begin 644 data.bin\n";
    for (size_t line = 0; line < bytes.size(); line += 45) {
        const size_t n = std::min<size_t>(45, bytes.size() - line);
        out += digit(static_cast<unsigned>(n));
        for (size_t i = 0; i < n; i += 3) {
            unsigned char b[3] = {};
            for (size_t k = 0; k < 3 && i + k < n; ++k)
                b[k] = static_cast<unsigned char>(bytes[line + i + k]);
            out += digit(b[0] >> 2);
            out += digit(((b[0] & 3) << 4) | (b[1] >> 4));
            out += digit(((b[1] & 15) << 2) | (b[2] >> 6));
            out += digit(b[2] & 63);
        }
        out += "\n";
    }
    return out + "`\nend\n";
}

std::string random_bytes(size_t size, unsigned seed) {
    std::mt19937 random(seed);
    std::string out(size, '\0');
    for (char& c : out) c = static_cast<char>(random() & 0xff);
    return out;
}

}  // namespace

TEST_CASE("attachments: each transfer encoding is decoded and encoded again, large ones too") {
    // The content is streamed from the part straight into its base64 text: the same bytes as
    // decoding it whole and encoding the result.
    const std::string small = random_bytes(1000, 1);
    const std::string large = random_bytes(3 * 1024 * 1024 + 1, 2);  // not a multiple of 3
    struct Part {
        const char* encoding;
        std::string bytes, body;
    };
    const std::vector<Part> parts = {
        {"base64", small, base64_lines(small, 76)},
        {"base64", small, base64_lines(small, 1)},  // every slice ends mid-quantum
        {"base64", large, base64_lines(large, 76)},
        {"quoted-printable", small, quoted_printable(small)},
        {"x-uuencode", small, uuencode(small)},
        {"8bit", "caf\xc3\xa9", "caf\xc3\xa9\n"},  // the last line break belongs to the boundary
        {"7bit", "", ""},
    };
    std::string source =
        "From: app@contoso.com\nTo: a@example.net\nMIME-Version: 1.0\n"
        "Content-Type: multipart/mixed; boundary=m\n\n--m\nContent-Type: text/plain\n\nText.\n";
    for (size_t i = 0; i < parts.size(); ++i) {
        source += "--m\nContent-Type: application/octet-stream; name=p" + std::to_string(i) +
                  ".bin\nContent-Disposition: attachment\nContent-Transfer-Encoding: " +
                  parts[i].encoding + "\n\n" + parts[i].body;
    }
    source += "--m--\n";

    paasmilter::testing::TempDir dir;
    const std::string path = dir.write("m.eml", crlf(source));
    auto from_file = convert_message_file(path, envelope({"a@example.net"}), base_options());
    REQUIRE(from_file.ok());
    for (const EmailMessage& message :
         {convert_ok(source, envelope({"a@example.net"})), std::move(from_file).value()}) {
        REQUIRE(message.attachments.size() == parts.size());
        for (size_t i = 0; i < parts.size(); ++i) {
            CAPTURE(i);
            const Attachment& attachment = message.attachments[i];
            CHECK(attachment.size == parts[i].bytes.size());
            CHECK(attachment.content_base64 == reference_base64(parts[i].bytes));
        }
    }
}

TEST_CASE("body: which parts are the text") {
    SUBCASE("alternative: the last rendering of each kind wins") {
        const auto message = convert_ok(
            "From: app@contoso.com\nTo: a@example.net\nMIME-Version: 1.0\n"
            "Content-Type: multipart/alternative; boundary=a\n\n"
            "--a\nContent-Type: text/plain\n\nfirst\n--a\nContent-Type: text/enriched\n\n<b>x</b>\n"
            "--a\nContent-Type: text/plain\n\nsecond\n--a\nContent-Type: text/html\n\n<p>h</p>\n"
            "--a--\n",
            envelope({"a@example.net"}));
        CHECK(message.plain_text == "second");
        CHECK(message.html == "<p>h</p>");
        CHECK(message.attachments.size() == 1);  // text/enriched: not a rendering ACS carries
    }
    SUBCASE("mixed: the first text is the body, later ones are attachments") {
        const auto message = convert_ok(
            "From: app@contoso.com\nTo: a@example.net\nMIME-Version: 1.0\n"
            "Content-Type: multipart/mixed; boundary=m\n\n"
            "--m\nContent-Type: application/pdf\nContent-Disposition: attachment\n\n%PDF\n"
            "--m\nContent-Type: text/plain\n\nbody\n"
            "--m\nContent-Type: text/html\n\n<p>footer</p>\n"
            "--m\nContent-Type: text/plain; name=log.txt\n\nlog line\n"
            "--m\nContent-Type: text/plain\nContent-Disposition: attachment\n\nattached\n--m--\n",
            envelope({"a@example.net"}));
        CHECK(message.plain_text == "body");
        CHECK_FALSE(message.html);
        REQUIRE(message.attachments.size() == 4);
        CHECK(message.attachments[0].name == "attachment-1.pdf");
        CHECK(message.attachments[1].name == "attachment-2.html");
        CHECK(message.attachments[2].name == "log.txt");
        CHECK(message.attachments[3].name == "attachment-4.txt");
    }
    SUBCASE("undeclared 8-bit text is UTF-8 if valid, else Windows-1252") {
        auto message = convert_ok(
            "From: app@contoso.com\nTo: a@example.net\n\nPreis: 5 \x80, Gr\xfc\xdf"
            "e\n",
            envelope({"a@example.net"}));
        CHECK(message.plain_text == "Preis: 5 €, Grüße\n");
        message = convert_ok(
            "From: app@contoso.com\nTo: a@example.net\n\nGr\xc3\xbc\xc3\x9f"
            "e\n",
            envelope({"a@example.net"}));
        CHECK(message.plain_text == "Grüße\n");
    }
    SUBCASE("a boundary that never matches: the text is still sent") {
        const auto message = convert_ok(
            "From: app@contoso.com\nTo: a@example.net\nMIME-Version: 1.0\n"
            "Content-Type: multipart/mixed; boundary=nowhere\n\n--elsewhere\n\nThe text.\n",
            envelope({"a@example.net"}));
        REQUIRE(message.plain_text);
        CHECK(message.plain_text->find("The text.") != std::string::npos);
    }
}

TEST_CASE("limits: too many MIME parts is an error the caller can recognise") {
    std::string source =
        "From: app@contoso.com\nTo: a@example.net\nMIME-Version: 1.0\n"
        "Content-Type: multipart/mixed; boundary=x\n\n";
    for (int i = 0; i < 10000; ++i) source += "--x\nContent-Type: text/plain\n\npart\n";
    source += "--x--\n";
    auto result = convert_message(source, envelope({"a@example.net"}), base_options());
    REQUIRE_FALSE(result.ok());
    CHECK(result.error().message == kTooManyMimeParts);
    CHECK(result.error().kind == ErrorKind::too_many_mime_parts);

    // The cap counts the multipart and its leaves: 1 + 4 parts.
    std::string small =
        "From: app@contoso.com\nTo: a@example.net\nMIME-Version: 1.0\n"
        "Content-Type: multipart/mixed; boundary=x\n\n";
    for (int i = 0; i < 4; ++i) small += "--x\nContent-Type: text/plain\n\npart\n";
    small += "--x--\n";
    ConversionOptions options = base_options();
    options.max_mime_parts = 5;
    CHECK(convert_message(small, envelope({"a@example.net"}), options).ok());
    options.max_mime_parts = 4;
    CHECK_FALSE(convert_message(small, envelope({"a@example.net"}), options).ok());
}

TEST_CASE("limits: deep nesting, giant headers and garbage do not crash") {
    std::string deep =
        "From: app@contoso.com\nTo: a@example.net\nMIME-Version: 1.0\n"
        "Content-Type: multipart/mixed; boundary=b0\n\n";
    for (int i = 1; i < 5000; ++i)
        deep += "--b" + std::to_string(i - 1) + "\nContent-Type: multipart/mixed; boundary=b" +
                std::to_string(i) + "\n\n";
    deep += "--b4999\nContent-Type: text/plain\n\ndeep\n";
    auto result = convert_message(deep, envelope({"a@example.net"}), base_options());
    REQUIRE_FALSE(result.ok());
    CHECK(result.error().message == kTooManyMimeParts);
    CHECK(result.error().kind == ErrorKind::too_many_mime_parts);

    const std::string giant =
        "From: app@contoso.com\nTo: a@example.net\nSubject: " + std::string(2'000'000, 'S') +
        "\nX-Big: " + std::string(1'000'000, 'x') + "\n\nbody\n";
    auto message = convert_ok(giant, envelope({"a@example.net"}));
    CHECK(message.subject.size() == 2'000'000);

    for (const std::string& junk :
         {std::string(), std::string("\n\n\n"), std::string("no header at all"),
          std::string("\0\0\0\xff\xfe", 5), std::string("Content-Type: multipart/mixed\n\n--")}) {
        result = convert_message(junk, envelope({"a@example.net"}), base_options());
        if (result.ok()) CHECK_NOTHROW((void)to_acs_json(*result));
    }
}

TEST_CASE("limits: randomly damaged corpus messages never crash and stay valid JSON") {
    std::mt19937 random(20261123);
    const auto cases = load_corpus();
    int converted = 0;
    for (int round = 0; round < 300; ++round) {
        const auto& item = cases[static_cast<size_t>(round) % cases.size()];
        std::string source = read_file(item.eml);
        const int damage = 1 + static_cast<int>(random() % 8);
        for (int d = 0; d < damage && !source.empty(); ++d) {
            const size_t at = random() % source.size();
            switch (random() % 4) {
                case 0:
                    source[at] = static_cast<char>(random() % 256);
                    break;
                case 1:
                    source.erase(at, random() % 64);
                    break;
                case 2:
                    source.insert(at, source.substr(random() % source.size(), 40));
                    break;
                case 3:
                    source.resize(at);
                    break;
            }
        }
        auto result = convert_message(source, item.envelope, item.options);
        if (!result.ok()) continue;
        ++converted;
        const std::string body = to_acs_json(*result);
        CHECK(json::accept(body));  // strict: valid JSON and valid UTF-8
    }
    CHECK(converted > 0);
}

TEST_CASE("convert_message_file: a missing file is an error naming it") {
    paasmilter::testing::TempDir dir;
    const std::string path = (dir.path() / "missing.eml").string();
    auto result = convert_message_file(path, envelope({"a@example.net"}), base_options());
    REQUIRE_FALSE(result.ok());
    CHECK(result.error().file == path);

    const std::string written = dir.write("m.eml", read_file(kCorpus / "scanner.eml"));
    auto message = convert_message_file(written, envelope({"alice@example.net"}), base_options());
    REQUIRE(message.ok());
    CHECK(message->attachments.size() == 1);
}

// ---- RFC 2045 defaults, named inline text, missing blank lines, folded controls ----

TEST_CASE("MIME body: Content-Type text without a subtype is text/plain (RFC 2045 5.2)") {
    SUBCASE("the whole message") {
        const auto message = convert_ok(
            "From: app@contoso.com\nTo: a@example.net\nMIME-Version: 1.0\nContent-Type: text\n\n"
            "hello\n",
            envelope({"a@example.net"}));
        CHECK(message.plain_text == "hello\n");
        CHECK(message.attachments.empty());
    }
    SUBCASE("its parameters still count: the charset converts") {
        const auto message = convert_ok(
            "From: app@contoso.com\nTo: a@example.net\nMIME-Version: 1.0\n"
            "Content-Type: TEXT ; charset=\"iso-8859-15\"\n\n5 \xa4, caf\xe9\n",
            envelope({"a@example.net"}));
        CHECK(message.plain_text == "5 €, café\n");
    }
    SUBCASE("a part, with an empty subtype") {
        const auto message = convert_ok(
            "From: app@contoso.com\nTo: a@example.net\nMIME-Version: 1.0\n"
            "Content-Type: multipart/mixed; boundary=m\n\n"
            "--m\nContent-Type: text/\n\nthe text\n"
            "--m\nContent-Type: application/pdf; name=a.pdf\n\n%PDF\n--m--\n",
            envelope({"a@example.net"}));
        CHECK(message.plain_text == "the text");
        REQUIRE(message.attachments.size() == 1);
        CHECK(message.attachments[0].name == "a.pdf");
    }
    SUBCASE("another type without a subtype stays an attachment") {
        const auto message = convert_ok(
            "From: app@contoso.com\nTo: a@example.net\nMIME-Version: 1.0\n"
            "Content-Type: multipart/mixed; boundary=m\n\n"
            "--m\nContent-Type: text/plain\n\nbody\n--m\nContent-Type: image\n\nGIF89a\n--m--\n",
            envelope({"a@example.net"}));
        CHECK(message.plain_text == "body");
        REQUIRE(message.attachments.size() == 1);
        CHECK(message.attachments[0].content_type == "application/octet-stream");
    }
}

TEST_CASE("MIME body: a named inline text part is the body when there is no other") {
    SUBCASE("inline disposition with a file name, beside a PDF (scanners send this)") {
        const auto message = convert_ok(
            "From: scan@printers.local\nTo: a@example.net\nMIME-Version: 1.0\n"
            "Content-Type: multipart/mixed; boundary=m\n\n"
            "--m\nContent-Type: text/plain; name=\"body.txt\"\n"
            "Content-Disposition: inline; filename=\"body.txt\"\n\nScanned.\n"
            "--m\nContent-Type: application/pdf; name=scan.pdf\n"
            "Content-Disposition: attachment; filename=scan.pdf\n\n%PDF\n--m--\n",
            envelope({"a@example.net"}));
        CHECK(message.plain_text == "Scanned.");
        REQUIRE(message.attachments.size() == 1);
        CHECK(message.attachments[0].name == "scan.pdf");
    }
    SUBCASE("no disposition, only name=, as the whole message") {
        const auto message = convert_ok(
            "From: app@contoso.com\nTo: a@example.net\nMIME-Version: 1.0\n"
            "Content-Type: text/html; charset=utf-8; name=report.html\n\n<p>report</p>\n",
            envelope({"a@example.net"}));
        CHECK(message.html == "<p>report</p>\n");
        CHECK(message.attachments.empty());
    }
    SUBCASE("a body found elsewhere keeps the named part an attachment") {
        const auto message = convert_ok(
            "From: app@contoso.com\nTo: a@example.net\nMIME-Version: 1.0\n"
            "Content-Type: multipart/mixed; boundary=m\n\n"
            "--m\nContent-Type: text/plain; name=log.txt\nContent-Disposition: inline\n\nlog\n"
            "--m\nContent-Type: text/plain\n\nthe body\n--m--\n",
            envelope({"a@example.net"}));
        CHECK(message.plain_text == "the body");
        REQUIRE(message.attachments.size() == 1);
        CHECK(message.attachments[0].name == "log.txt");
    }
    SUBCASE("an attachment disposition is never the body") {
        const auto message = convert_ok(
            "From: app@contoso.com\nTo: a@example.net\nMIME-Version: 1.0\n"
            "Content-Type: text/plain; name=log.txt\nContent-Disposition: attachment\n\nlog\n",
            envelope({"a@example.net"}));
        CHECK(message.plain_text == "");
        REQUIRE(message.attachments.size() == 1);
        CHECK(message.attachments[0].name == "log.txt");
    }
}

TEST_CASE("MIME malformed: a header block without its blank line keeps its text") {
    const Envelope to_a = envelope({"a@example.net"});
    const std::string top = "From: app@contoso.com\nTo: a@example.net\nMIME-Version: 1.0\n";
    const std::string pdf =
        "--b\nContent-Type: application/pdf; name=r.pdf\nContent-Transfer-Encoding: base64\n\n"
        "JVBERi0xLjQKJSVFT0YK\n--b--\n";
    // Each message with LF and with CRLF line ends (Postfix hands the milter CRLF).
    auto convert_both = [&](const std::string& text) {
        std::vector<EmailMessage> out;
        for (const std::string& source : {text, crlf(text)})
            out.push_back(convert_ok(source, to_a));
        return out;
    };
    auto plain = [](const EmailMessage& m) {
        std::string text = m.plain_text.value_or("<none>");
        std::erase(text, '\r');
        return text;
    };

    SUBCASE("a part whose text follows its header directly") {
        for (const auto& message :
             convert_both(top +
                          "Content-Type: multipart/mixed; boundary=b\n\n"
                          "--b\nContent-Type: text/plain\nHello world\nMore text\n" +
                          pdf)) {
            CHECK(plain(message) == "Hello world\nMore text");
            REQUIRE(message.attachments.size() == 1);
            CHECK(message.attachments[0].name == "r.pdf");
        }
    }
    SUBCASE("a part without any header, text right after the boundary") {
        for (const auto& message : convert_both(top +
                                                "Content-Type: multipart/mixed; boundary=b\n\n"
                                                "--b\nHello there\nsecond line\n" +
                                                pdf)) {
            CHECK(plain(message) == "Hello there\nsecond line");
            CHECK(message.attachments.size() == 1);
        }
    }
    SUBCASE("the message's own body right after its header") {
        for (const auto& message :
             convert_both(top + "Subject: x\nHello world\nsecond\n\nthird\n")) {
            CHECK(message.subject == "x");
            CHECK(plain(message) == "Hello world\nsecond\n\nthird\n");
        }
    }
    SUBCASE("a header block that ends at the end of the data") {
        for (const auto& message : convert_both(top + "Subject: x\nHello world")) {
            CHECK(message.subject == "x");
            CHECK(plain(message) == "Hello world");
        }
        for (const auto& message : convert_both(top + "Subject: only a header"))
            CHECK(plain(message) == "");
    }
    SUBCASE("a broken header line followed by more headers is only dropped") {
        for (const auto& message :
             convert_both("From: app@contoso.com\nTo: a@example.net\nBroken line\nSubject: x\n"
                          "X-Tag: t\n\nbody\n")) {
            CHECK(message.subject == "x");
            CHECK(plain(message) == "body\n");
            CHECK(message.headers ==
                  std::vector<std::pair<std::string, std::string>>{{"X-Tag", "t"}});
        }
    }
    SUBCASE("a part opening with a stray line, then its header") {
        for (const auto& message :
             convert_both(top +
                          "Content-Type: multipart/mixed; boundary=b\n\n"
                          "--b\nstray line\nContent-Type: text/plain\n\nbody\n" +
                          pdf)) {
            CHECK(plain(message) == "body");
            CHECK(message.attachments.size() == 1);
        }
    }
    SUBCASE("text GMime cannot take apart at all is an error, not an empty message") {
        for (const std::string& source :
             {top + "Subject: x\nHello", crlf(top + "Subject: x\nHello")}) {
            auto result = convert_message(source, to_a, base_options());
            REQUIRE_FALSE(result.ok());
            CHECK_FALSE(result.error().message.empty());
        }
    }
    SUBCASE("the same from a file") {
        paasmilter::testing::TempDir dir;
        const std::string path =
            dir.write("m.eml", top +
                                   "Content-Type: multipart/mixed; boundary=b\n\n"
                                   "--b\nContent-Type: text/plain\nHello world\n" +
                                   pdf);
        auto result = convert_message_file(path, to_a, base_options());
        REQUIRE(result.ok());
        CHECK(result->plain_text == "Hello world");
        CHECK(result->attachments.size() == 1);
    }
}

TEST_CASE("MIME text: CR, LF and other controls from RFC 2047 fold to one space") {
    const auto message = convert_ok(
        "From: app@contoso.com\n"
        "To: =?utf-8?q?Bob=0D=0A_Smith?= <bob@example.net>\n"
        "Cc: =?utf-8?b?QW5uCkJjYzogZXZpbEBleGFtcGxlLm9yZw==?= <ann@example.net>\n"
        "Reply-To: =?utf-8?q?Help=0Ddesk=09?= <help@contoso.com>\n"
        "Subject: =?utf-8?q?hello=0D=0Aworld?= =?utf-8?q?_and=C2=85next=E2=80=A8line?=\n"
        "MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=m\n\n"
        "--m\nContent-Type: text/plain\n\nbody\n"
        "--m\nContent-Type: application/pdf; name=\"=?utf-8?q?a=0D=0Ab.pdf?=\"\n\n%PDF\n"
        "--m\nContent-Type: application/pdf\n"
        "Content-Disposition: attachment; filename*=utf-8''c%0D%0A%0Dd%E2%80%A9e.pdf\n\n%PDF\n"
        "--m--\n",
        envelope({"bob@example.net", "ann@example.net"}));
    CHECK(message.subject == "hello world and next line");
    REQUIRE(message.to.size() == 1);
    CHECK(message.to[0].display_name == "Bob Smith");
    REQUIRE(message.cc.size() == 1);
    CHECK(message.cc[0].display_name == "Ann Bcc: evil@example.org");
    REQUIRE(message.reply_to.size() == 1);
    CHECK(message.reply_to[0].display_name == "Help desk");
    REQUIRE(message.attachments.size() == 2);
    CHECK(message.attachments[0].name == "a b.pdf");
    CHECK(message.attachments[1].name == "c d e.pdf");
}

namespace {

// Bytes of address space this process has mapped now.
size_t address_space_size() {
    std::ifstream statm("/proc/self/statm");
    size_t pages = 0;
    statm >> pages;
    return pages * static_cast<size_t>(::sysconf(_SC_PAGESIZE));
}

// Runs `body` in a child process that may map at most `headroom` more bytes: its wait status,
// exit code 0 when it returned true. GLib aborts on a failed allocation, so a conversion that
// needs more dies.
template <class Body>
int in_child_with_memory_limit(size_t headroom, Body body) {
    const pid_t pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
        // The default action, not doctest's handlers: the parent reports.
        for (const int signal : {SIGABRT, SIGSEGV, SIGTRAP, SIGBUS}) std::signal(signal, SIG_DFL);
        const rlim_t limit = address_space_size() + headroom;
        const struct rlimit rl { limit, limit };
        if (::setrlimit(RLIMIT_AS, &rl) != 0) ::_exit(3);
        ::_exit(body() ? 0 : 1);
    }
    int status = 0;
    REQUIRE(::waitpid(pid, &status, 0) == pid);
    return status;
}

}  // namespace

TEST_CASE("MIME limits: a flood of empty parts is refused before GMime builds them") {
    auto flood = [](const std::string& content_type, int parts) {
        std::string source =
            "From: app@contoso.com\nTo: a@example.net\nMIME-Version: 1.0\n" + content_type + "\n\n";
        source.reserve(source.size() + static_cast<size_t>(parts) * 5 + 16);
        for (int i = 0; i < parts; ++i) source += "--b\n\n";
        return source + "--b--\n";
    };
    // The boundary as a plain parameter, RFC 2231-encoded and (GMime decodes whole fields
    // first) RFC 2047-encoded: all are GMime's to read.
    const std::vector<std::string> types = {
        "Content-Type: multipart/mixed; boundary=b",
        "Content-Type: multipart/mixed;\n boundary*=us-ascii''%62",
        "Content-Type: multipart/mixed; boundary==?us-ascii?q?b?=",
        "Content-Type: multipart/mixed; =?us-ascii?q?boundary=3Db?="};
    const Envelope to_a = envelope({"a@example.net"});
    const ConversionOptions options = base_options();
    for (const std::string& type : types) {
        CAPTURE(type);
        auto result = convert_message(flood(type, 600), to_a, options);
        REQUIRE_FALSE(result.ok());
        CHECK(result.error().message == kTooManyMimeParts);
        CHECK(result.error().kind == ErrorKind::too_many_mime_parts);
    }

    // 200,000 empty parts in a megabyte: GMime's tree of them would take some 250 MB.
    std::vector<std::string> floods;
    for (const std::string& type : types) floods.push_back(flood(type, 200'000));
    paasmilter::testing::TempDir dir;
    const std::string path = dir.write("flood.eml", floods[1]);
    const int status = in_child_with_memory_limit(64u << 20, [&] {
        for (const std::string& source : floods) {
            auto result = convert_message(source, to_a, options);
            if (result.ok() || result.error().message != kTooManyMimeParts) return false;
        }
        auto result = convert_message_file(path, to_a, options);
        return !result.ok() && result.error().message == kTooManyMimeParts;
    });
    CHECK_MESSAGE((WIFEXITED(status) && WEXITSTATUS(status) == 0), "child wait status ", status);
}

TEST_CASE("MIME limits: lines that only look like boundaries are not parts") {
    std::string text;
    for (int i = 0; i < 2000; ++i) text += "-- comment " + std::to_string(i) + "\n--\n";
    const auto message = convert_ok(
        "From: app@contoso.com\nTo: a@example.net\nMIME-Version: 1.0\n"
        "Content-Type: multipart/mixed; boundary=\"b b\"\n\n"
        "--b b\nContent-Type: text/plain\n\n" +
            text + "--b b \nContent-Type: text/x-sql; name=q.sql\n\n" + text + "--b b--\n",
        envelope({"a@example.net"}));
    REQUIRE(message.plain_text);
    CHECK(message.plain_text->size() == text.size() - 1);
    REQUIRE(message.attachments.size() == 1);
    CHECK(message.attachments[0].name == "q.sql");
}
