// MIME -> EmailMessage with GMime 3. GMime does all MIME work (parsing, transfer decodings,
// RFC 2047/2231, charset conversion); this file only decides what goes where.
#include "paasmilter/mime_convert.hpp"
#include "paasmilter/gmime_support.hpp"
#include "paasmilter/mapped_file.hpp"
#include "paasmilter/text.hpp"

#include <fcntl.h>
#include <gmime/gmime.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <unordered_set>
#include <utility>

namespace paasmilter {
namespace {

// ---- RAII for GLib/GMime objects ----

struct GObjectUnref {
    void operator()(gpointer object) const {
        if (object) g_object_unref(object);
    }
};
template <class T>
using GObjectPtr = std::unique_ptr<T, GObjectUnref>;

struct GFree {
    void operator()(gpointer memory) const { g_free(memory); }
};
using GCharPtr = std::unique_ptr<char, GFree>;

// ---- small string helpers ----

std::string_view trim(std::string_view text) {
    const char* space = " \t\r\n\f\v";
    const auto first = text.find_first_not_of(space);
    if (first == std::string_view::npos) return {};
    return text.substr(first, text.find_last_not_of(space) - first + 1);
}

std::string_view or_empty(const char* text) {
    return text ? std::string_view(text) : "";
}

// Valid UTF-8 for JSON: NULs removed, invalid sequences replaced by U+FFFD.
std::string clean_utf8(std::string_view text) {
    std::string without_nul;
    without_nul.reserve(text.size());
    for (char c : text)
        if (c != '\0') without_nul += c;
    if (g_utf8_validate(without_nul.data(), static_cast<gssize>(without_nul.size()), nullptr))
        return without_nul;
    GCharPtr valid(g_utf8_make_valid(without_nul.data(), static_cast<gssize>(without_nul.size())));
    return valid ? std::string(valid.get()) : std::string();
}

// Text for a one-line field (subject, display name, file name). RFC 2047 and 2231 decode to any
// character, CR and LF included: each run of control or line-separating characters, with the
// spaces around it, becomes one space. `utf8` must be valid UTF-8.
std::string single_line(std::string_view utf8) {
    std::string out;
    out.reserve(utf8.size());
    bool fold = false;
    const char* const end = utf8.data() + utf8.size();
    for (const char* at = utf8.data(); at < end; at = g_utf8_next_char(at)) {
        const gunichar c = g_utf8_get_char(at);
        if (c < 0x20 || (c >= 0x7f && c <= 0x9f) || c == 0x2028 || c == 0x2029) {
            while (!out.empty() && out.back() == ' ') out.pop_back();
            fold = true;
            continue;
        }
        if (fold) {
            if (c == ' ') continue;
            if (!out.empty()) out += ' ';
            fold = false;
        }
        out.append(at, static_cast<size_t>(g_utf8_next_char(at) - at));
    }
    return out;
}

// A display name or subject: GMime already decoded RFC 2047 to UTF-8; make sure of it.
std::string clean_text(const char* text) {
    return std::string(trim(single_line(clean_utf8(or_empty(text)))));
}

// ---- MIME entity helpers ----

std::string media_type(GMimeObject* object) {
    GMimeContentType* type = g_mime_object_get_content_type(object);
    if (!type) return "application/octet-stream";
    std::string media = ascii_lowercase(or_empty(g_mime_content_type_get_media_type(type)));
    std::string sub = ascii_lowercase(or_empty(g_mime_content_type_get_media_subtype(type)));
    if (media.empty() || sub.empty()) return "application/octet-stream";
    return media + "/" + sub;
}

bool is_attachment_disposition(GMimeObject* object) {
    GMimeContentDisposition* disposition = g_mime_object_get_content_disposition(object);
    return disposition && g_mime_content_disposition_is_attachment(disposition);
}

std::string file_name(GMimeObject* object) {
    if (GMIME_IS_PART(object))
        return std::string(or_empty(g_mime_part_get_filename(GMIME_PART(object))));
    // GMimeMessagePart is not a GMimePart: look the parameters up the same way GMime does.
    const char* name = g_mime_object_get_content_disposition_parameter(object, "filename");
    if (!name) name = g_mime_object_get_content_type_parameter(object, "name");
    return std::string(or_empty(name));
}

enum class BodyKind { none, plain, html };

// text/plain or text/html that a mail client would show as the message text: not marked as an
// attachment and, unless `named_too`, without a file name (a named text part is usually a file
// someone attached).
BodyKind body_kind(GMimeObject* object, bool named_too) {
    if (!GMIME_IS_PART(object) || is_attachment_disposition(object)) return BodyKind::none;
    if (!named_too && !file_name(object).empty()) return BodyKind::none;
    const std::string type = media_type(object);
    if (type == "text/plain") return BodyKind::plain;
    if (type == "text/html") return BodyKind::html;
    return BodyKind::none;
}

// The decoded (transfer encoding removed) bytes of a leaf, optionally through filters.
std::string decoded_bytes(GMimePart* part, GMimeFilter* charset_filter = nullptr,
                          bool dos2unix = false) {
    GMimeDataWrapper* content = g_mime_part_get_content(part);
    if (!content) return {};
    GObjectPtr<GMimeStream> memory(g_mime_stream_mem_new());
    if (charset_filter || dos2unix) {
        GObjectPtr<GMimeStream> filtered(g_mime_stream_filter_new(memory.get()));
        if (charset_filter)
            g_mime_stream_filter_add(GMIME_STREAM_FILTER(filtered.get()), charset_filter);
        if (dos2unix) {
            GObjectPtr<GMimeFilter> newlines(g_mime_filter_dos2unix_new(FALSE));
            g_mime_stream_filter_add(GMIME_STREAM_FILTER(filtered.get()), newlines.get());
        }
        g_mime_data_wrapper_write_to_stream(content, filtered.get());
        g_mime_stream_flush(filtered.get());
    } else {
        g_mime_data_wrapper_write_to_stream(content, memory.get());
    }
    GByteArray* bytes = g_mime_stream_mem_get_byte_array(GMIME_STREAM_MEM(memory.get()));
    if (!bytes || bytes->len == 0) return {};
    return std::string(reinterpret_cast<const char*>(bytes->data), bytes->len);
}

bool is_utf8_or_ascii_charset(std::string_view charset) {
    return iequals(charset, "utf-8") || iequals(charset, "utf8") || iequals(charset, "us-ascii") ||
           iequals(charset, "ascii") || iequals(charset, "ansi_x3.4-1968");
}

// A text part as UTF-8 with LF line ends. The declared charset is converted by GMime's charset
// filter; undeclared, unknown or lying (8-bit "us-ascii") charsets go through GMime's 8-bit
// guesser with the parser's fallback charsets.
std::string text_content(GMimePart* part, GMimeParserOptions* parser_options) {
    const std::string charset(
        or_empty(g_mime_object_get_content_type_parameter(GMIME_OBJECT(part), "charset")));
    if (!charset.empty() && !is_utf8_or_ascii_charset(charset)) {
        GObjectPtr<GMimeFilter> filter(g_mime_filter_charset_new(charset.c_str(), "UTF-8"));
        if (filter) return clean_utf8(decoded_bytes(part, filter.get(), true));
    }
    std::string bytes = decoded_bytes(part, nullptr, true);
    std::erase(bytes, '\0');
    if (g_utf8_validate(bytes.data(), static_cast<gssize>(bytes.size()), nullptr)) return bytes;
    // Declared UTF-8 with a few bad bytes: keep the rest, replace those.
    if (iequals(charset, "utf-8") || iequals(charset, "utf8")) return clean_utf8(bytes);
    GCharPtr guessed(g_mime_utils_decode_8bit(parser_options, bytes.data(), bytes.size()));
    return clean_utf8(or_empty(guessed.get()));
}

// Base64 without line breaks, appended to `out` as the bytes come: a large attachment is
// encoded into the one string that carries it to the request, without a decoded copy of it
// first or a second encoded one (g_base64_encode's, then a std::string of it).
class Base64Writer {
  public:
    // `bound`: at most this many bytes will be written (0: unknown). The string is reserved
    // once; pages of the reservation that stay unused are never touched, so cost no memory.
    Base64Writer(std::string& out, size_t bound) : out_(out) {
        if (bound > 0) out_.reserve(out_.size() + (bound + 2) / 3 * 4);
    }
    void write(const char* data, size_t length) {
        size_ += length;
        // g_base64_encode_step writes at most (length / 3 + 1) * 4 + 4 bytes without breaks.
        const size_t at = out_.size();
        out_.resize(at + (length / 3 + 1) * 4 + 4);
        const size_t n = g_base64_encode_step(reinterpret_cast<const guchar*>(data), length, FALSE,
                                              out_.data() + at, &state_, &save_);
        out_.resize(at + n);
    }
    // Returns how many bytes were encoded.
    size_t close() {
        char tail[4];
        const size_t n = g_base64_encode_close(FALSE, tail, &state_, &save_);
        out_.append(tail, n);
        return size_;
    }

  private:
    std::string& out_;
    size_t size_ = 0;
    gint state_ = 0;
    gint save_ = 0;
};

// A leaf's content, transfer encoding removed (as g_mime_data_wrapper_write_to_stream does),
// base64-encoded into `out`; returns the decoded size. Reads in slices: the parser left the
// content in the spool file, and no decoded copy of it is ever whole in memory.
size_t content_base64(GMimePart* part, std::string& out) {
    GMimeDataWrapper* content = g_mime_part_get_content(part);
    // GMime 3: the wrapper keeps its stream (transfer none).
    GMimeStream* raw = content ? g_mime_data_wrapper_get_stream(content) : nullptr;
    if (!raw) return 0;
    const GMimeContentEncoding encoding = g_mime_data_wrapper_get_encoding(content);
    g_mime_stream_reset(raw);
    GObjectPtr<GMimeStream> decoded(g_mime_stream_filter_new(raw));
    switch (encoding) {
        case GMIME_CONTENT_ENCODING_BASE64:
        case GMIME_CONTENT_ENCODING_QUOTEDPRINTABLE:
        case GMIME_CONTENT_ENCODING_UUENCODE: {
            GObjectPtr<GMimeFilter> decoder(g_mime_filter_basic_new(encoding, FALSE));
            g_mime_stream_filter_add(GMIME_STREAM_FILTER(decoded.get()), decoder.get());
            break;
        }
        default:
            break;
    }
    // Decoding never makes content longer; base64 makes 3/4 of it at most.
    const gint64 length = g_mime_stream_length(raw);
    size_t bound = length > 0 ? static_cast<size_t>(length) : 0;
    if (encoding == GMIME_CONTENT_ENCODING_BASE64) bound = bound / 4 * 3 + 3;
    Base64Writer writer(out, bound);
    // As g_mime_stream_write_to_stream reads: a filter may yield nothing for a slice it took
    // in (0 is not the end; the end is eos, after the decoder's last bytes).
    char buffer[16 * 1024];
    while (!g_mime_stream_eos(decoded.get())) {
        const ssize_t n = g_mime_stream_read(decoded.get(), buffer, sizeof buffer);
        if (n < 0) break;
        if (n > 0) writer.write(buffer, static_cast<size_t>(n));
    }
    g_mime_stream_reset(raw);
    return writer.close();
}

// Base64 of bytes already in memory (a forwarded message GMime wrote out).
size_t bytes_base64(std::string_view bytes, std::string& out) {
    Base64Writer writer(out, bytes.size());
    writer.write(bytes.data(), bytes.size());
    return writer.close();
}

std::string extension_for(std::string_view type) {
    static const std::pair<std::string_view, std::string_view> known[] = {
        {"application/pdf", "pdf"},
        {"application/zip", "zip"},
        {"application/json", "json"},
        {"application/xml", "xml"},
        {"application/msword", "doc"},
        {"application/vnd.ms-excel", "xls"},
        {"application/vnd.openxmlformats-officedocument.wordprocessingml.document", "docx"},
        {"application/vnd.openxmlformats-officedocument.spreadsheetml.sheet", "xlsx"},
        {"application/pkcs7-signature", "p7s"},
        {"application/x-pkcs7-signature", "p7s"},
        {"application/pkcs7-mime", "p7m"},
        {"application/pgp-signature", "asc"},
        {"application/ics", "ics"},
        {"image/jpeg", "jpg"},
        {"image/png", "png"},
        {"image/gif", "gif"},
        {"image/tiff", "tif"},
        {"image/bmp", "bmp"},
        {"image/webp", "webp"},
        {"image/svg+xml", "svg"},
        {"text/plain", "txt"},
        {"text/html", "html"},
        {"text/csv", "csv"},
        {"text/xml", "xml"},
        {"text/calendar", "ics"},
        {"message/rfc822", "eml"},
        {"message/delivery-status", "txt"},
    };
    for (const auto& [name, extension] : known)
        if (name == type) return std::string(extension);
    return "bin";
}

// The last path component, on one line (names come from untrusted mail).
std::string clean_file_name(std::string_view raw) {
    std::string name = single_line(clean_utf8(raw));
    if (const auto slash = name.find_last_of("/\\"); slash != std::string::npos)
        name.erase(0, slash + 1);
    name = std::string(trim(name));
    if (name == "." || name == "..") name.clear();
    return name;
}

// ---- addresses ----

struct Mailbox {
    std::string address;
    std::string name;
};

// Mailboxes in order; group members are taken in place of their group
// ("undisclosed-recipients:;" simply contributes none).
void flatten(InternetAddressList* list, std::vector<Mailbox>& out, int depth = 0) {
    if (!list || depth > 8) return;
    const int count = internet_address_list_length(list);
    for (int i = 0; i < count; ++i) {
        InternetAddress* address = internet_address_list_get_address(list, i);
        if (INTERNET_ADDRESS_IS_GROUP(address)) {
            flatten(internet_address_group_get_members(INTERNET_ADDRESS_GROUP(address)), out,
                    depth + 1);
        } else if (INTERNET_ADDRESS_IS_MAILBOX(address)) {
            std::string addr = clean_utf8(trim(
                or_empty(internet_address_mailbox_get_addr(INTERNET_ADDRESS_MAILBOX(address)))));
            if (addr.empty()) continue;
            out.push_back({std::move(addr), clean_text(internet_address_get_name(address))});
        }
    }
}

std::vector<Mailbox> mailboxes(GMimeMessage* message, GMimeAddressType type,
                               const DomainMap& rewrite) {
    std::vector<Mailbox> out;
    flatten(g_mime_message_get_addresses(message, type), out);
    for (Mailbox& mailbox : out) mailbox.address = rewrite.apply(mailbox.address);
    return out;
}

// "<user@example.com>" or " user@example.com" -> "user@example.com".
std::string envelope_address(std::string_view raw) {
    std::string_view address = trim(raw);
    if (address.size() >= 2 && address.front() == '<' && address.back() == '>')
        address = trim(address.substr(1, address.size() - 2));
    return std::string(address);
}

std::string domain_of(std::string_view address) {
    const auto at = address.rfind('@');
    if (at == std::string_view::npos) return {};
    std::string domain = ascii_lowercase(address.substr(at + 1));
    while (!domain.empty() && domain.back() == '.') domain.pop_back();
    return domain;
}

bool in_verified_domain(std::string_view address, const std::vector<std::string>& verified) {
    const std::string domain = domain_of(address);
    if (domain.empty()) return false;
    return std::any_of(verified.begin(), verified.end(), [&](const std::string& candidate) {
        std::string wanted = ascii_lowercase(trim(candidate));
        while (!wanted.empty() && wanted.back() == '.') wanted.pop_back();
        return wanted == domain;
    });
}

EmailAddress to_email_address(const Mailbox& mailbox) {
    return {mailbox.address, mailbox.name};
}

// ---- headers ----

bool name_matches(std::string_view name, std::string_view pattern) {
    if (!pattern.empty() && pattern.back() == '*')
        return istarts_with(name, pattern.substr(0, pattern.size() - 1));
    return iequals(name, pattern);
}

bool never_passed(std::string_view name, const std::vector<std::string>& extra) {
    // Trace and authentication results belong to this hop; address, content and date headers
    // are rebuilt by the API from the JSON fields. x-ms-acsemail-* are ACS's own control headers
    // (learn.microsoft.com/azure/communication-services/concepts/email/email-headers): a client
    // must not be able to switch ACS validation off through its message.
    static constexpr std::string_view builtin[] = {"Received",
                                                   "Return-Path",
                                                   "DKIM-Signature",
                                                   "ARC-*",
                                                   "Authentication-Results",
                                                   "X-Original-To",
                                                   "Delivered-To",
                                                   "Content-*",
                                                   "MIME-Version",
                                                   "From",
                                                   "To",
                                                   "Cc",
                                                   "Bcc",
                                                   "Subject",
                                                   "Reply-To",
                                                   "Sender",
                                                   "Date",
                                                   "x-ms-acsemail-*"};
    for (std::string_view pattern : builtin)
        if (name_matches(name, pattern)) return true;
    return std::any_of(extra.begin(), extra.end(),
                       [&](const std::string& pattern) { return name_matches(name, pattern); });
}

bool valid_header_name(std::string_view name) {
    return !name.empty() && std::all_of(name.begin(), name.end(),
                                        [](char c) { return c > 32 && c < 127 && c != ':'; });
}

// The raw value with folding removed and outer white space trimmed; nullopt when it is empty or
// not clean text (NUL, other control characters, invalid UTF-8): such a header is dropped.
std::optional<std::string> header_value(const char* raw) {
    // GMime keeps the line end in the raw value but stores it as a C string: a value that does
    // not end in '\n' was cut short by a NUL byte.
    const std::string_view raw_value = or_empty(raw);
    if (raw_value.empty() || raw_value.back() != '\n') return std::nullopt;
    std::string value;
    for (char c : raw_value)
        if (c != '\r' && c != '\n') value += c;
    value = std::string(trim(value));
    if (value.empty()) return std::nullopt;
    for (char c : value)
        if ((static_cast<unsigned char>(c) < 0x20 && c != '\t') || c == 0x7f) return std::nullopt;
    if (!g_utf8_validate(value.data(), static_cast<gssize>(value.size()), nullptr))
        return std::nullopt;
    return value;
}

std::vector<std::pair<std::string, std::string>> pass_through_headers(
    GMimeMessage* message, const ConversionOptions& options) {
    std::vector<std::pair<std::string, std::string>> out;
    GMimeHeaderList* list = g_mime_object_get_header_list(GMIME_OBJECT(message));
    const int count = list ? g_mime_header_list_get_count(list) : 0;
    for (int i = 0; i < count; ++i) {
        GMimeHeader* header = g_mime_header_list_get_header_at(list, i);
        const std::string name(or_empty(g_mime_header_get_name(header)));
        if (!valid_header_name(name) || never_passed(name, options.never_pass_headers)) continue;
        if (std::none_of(options.pass_headers.begin(), options.pass_headers.end(),
                         [&](const std::string& pattern) { return name_matches(name, pattern); }))
            continue;
        // A JSON object has one value per name: the first occurrence wins.
        if (std::any_of(out.begin(), out.end(),
                        [&](const auto& kv) { return iequals(kv.first, name); }))
            continue;
        if (auto value = header_value(g_mime_header_get_raw_value(header)))
            out.emplace_back(name, std::move(*value));
    }
    return out;
}

// ---- body and attachments ----

// cid: URLs in the HTML, percent-decoded and lower-cased (RFC 2392).
std::unordered_set<std::string> cid_references(std::string_view html) {
    std::unordered_set<std::string> out;
    const std::string lowered = ascii_lowercase(html);
    for (size_t at = lowered.find("cid:"); at != std::string::npos;
         at = lowered.find("cid:", at + 4)) {
        size_t end = at + 4;
        while (end < lowered.size() && !std::strchr("\"'<> \t\r\n)", lowered[end])) ++end;
        const std::string encoded = lowered.substr(at + 4, end - at - 4);
        GCharPtr decoded(g_uri_unescape_string(encoded.c_str(), nullptr));
        out.insert(ascii_lowercase(decoded ? decoded.get() : encoded));
    }
    return out;
}

class Converter {
  public:
    Converter(GMimeParserOptions* parser_options, const ConversionOptions& options)
        : parser_options_(parser_options), options_(options) {}

    // Counted iteratively, before any recursion: the cap also bounds the recursion depth below.
    bool too_many_parts(GMimeObject* root) const {
        std::vector<GMimeObject*> pending{root};
        size_t seen = 0;
        while (!pending.empty()) {
            GMimeObject* object = pending.back();
            pending.pop_back();
            if (++seen > options_.max_mime_parts) return true;
            if (GMIME_IS_MULTIPART(object)) {
                GMimeMultipart* multipart = GMIME_MULTIPART(object);
                for (int i = g_mime_multipart_get_count(multipart) - 1; i >= 0; --i)
                    pending.push_back(g_mime_multipart_get_part(multipart, i));
            }
        }
        return false;
    }

    void convert(GMimeObject* root, EmailMessage& out) {
        Selection body = select(root, false);
        // No unnamed text: a named inline text part is then what mail clients show as the body
        // (printers and scanners send their text that way).
        if (body.empty()) body = select(root, true);
        if (body.plain) out.plain_text = text_content(body.plain, parser_options_);
        if (body.html) out.html = text_content(body.html, parser_options_);
        chosen_ = {body.plain, body.html};
        collect(root, out.attachments);

        // No MIME structure GMime could find (e.g. boundary never matched): its prologue is the
        // only text there is, better than sending nothing.
        if (!out.plain_text && !out.html && out.attachments.empty() && GMIME_IS_MULTIPART(root)) {
            const std::string prologue =
                clean_utf8(trim(or_empty(g_mime_multipart_get_prologue(GMIME_MULTIPART(root)))));
            if (!prologue.empty()) out.plain_text = prologue;
        }

        const std::unordered_set<std::string> referenced =
            out.html ? cid_references(*out.html) : std::unordered_set<std::string>{};
        std::unordered_set<std::string> used;
        for (Attachment& attachment : out.attachments) {
            const std::string key = ascii_lowercase(attachment.content_id);
            // ACS rejects duplicate content ids: only the first part with an id keeps it.
            const bool inline_part = options_.inline_attachments && !key.empty() &&
                                     referenced.count(key) && used.insert(key).second;
            if (!inline_part) attachment.content_id.clear();
        }
    }

  private:
    struct Selection {
        GMimePart* plain = nullptr;
        GMimePart* html = nullptr;
        bool empty() const { return !plain && !html; }
    };

    static GMimeObject* related_root(GMimeMultipart* related) {
        const int count = g_mime_multipart_get_count(related);
        if (count == 0) return nullptr;
        if (const char* start =
                g_mime_object_get_content_type_parameter(GMIME_OBJECT(related), "start")) {
            std::string wanted(trim(start));
            if (wanted.size() >= 2 && wanted.front() == '<' && wanted.back() == '>')
                wanted = wanted.substr(1, wanted.size() - 2);
            for (int i = 0; i < count; ++i) {
                GMimeObject* part = g_mime_multipart_get_part(related, i);
                if (iequals(or_empty(g_mime_object_get_content_id(part)), wanted)) return part;
            }
        }
        return g_mime_multipart_get_part(related, 0);
    }

    // Which leaves are the message text.
    Selection select(GMimeObject* object, bool named_too) {
        if (GMIME_IS_MULTIPART(object)) {
            GMimeMultipart* multipart = GMIME_MULTIPART(object);
            const int count = g_mime_multipart_get_count(multipart);
            const std::string type = media_type(object);
            if (type == "multipart/alternative") {
                // RFC 2046: alternatives in increasing faithfulness; keep the last plain and the
                // last HTML rendering, since ACS carries both.
                Selection best;
                for (int i = 0; i < count; ++i) {
                    const Selection candidate =
                        select(g_mime_multipart_get_part(multipart, i), named_too);
                    if (candidate.plain) best.plain = candidate.plain;
                    if (candidate.html) best.html = candidate.html;
                }
                // The renderings not chosen are the same text again: drop them rather than
                // attaching them. Other alternatives (text/calendar invitations) are attached.
                for (int i = 0; i < count; ++i) {
                    GMimeObject* part = g_mime_multipart_get_part(multipart, i);
                    if (body_kind(part, named_too) != BodyKind::none &&
                        part != GMIME_OBJECT(best.plain) && part != GMIME_OBJECT(best.html))
                        dropped_.insert(part);
                }
                return best;
            }
            if (type == "multipart/related") {
                GMimeObject* root = related_root(multipart);
                return root ? select(root, named_too) : Selection{};
            }
            // mixed, signed, report, unknown multiparts: the first entity with text is the body.
            for (int i = 0; i < count; ++i) {
                const Selection candidate =
                    select(g_mime_multipart_get_part(multipart, i), named_too);
                if (!candidate.empty()) return candidate;
            }
            return {};
        }
        switch (body_kind(object, named_too)) {
            case BodyKind::plain:
                return {GMIME_PART(object), nullptr};
            case BodyKind::html:
                return {nullptr, GMIME_PART(object)};
            case BodyKind::none:
                break;
        }
        return {};
    }

    // Every entity that is not the body becomes an attachment, in document order.
    void collect(GMimeObject* object, std::vector<Attachment>& out) {
        if (GMIME_IS_MULTIPART(object)) {
            GMimeMultipart* multipart = GMIME_MULTIPART(object);
            const int count = g_mime_multipart_get_count(multipart);
            for (int i = 0; i < count; ++i) collect(g_mime_multipart_get_part(multipart, i), out);
            return;
        }
        if (dropped_.count(object) || object == GMIME_OBJECT(chosen_.plain) ||
            object == GMIME_OBJECT(chosen_.html))
            return;

        Attachment attachment;
        if (GMIME_IS_MESSAGE_PART(object)) {
            attachment.content_type = "message/rfc822";
            if (GMimeMessage* inner = g_mime_message_part_get_message(GMIME_MESSAGE_PART(object))) {
                GObjectPtr<GMimeStream> memory(g_mime_stream_mem_new());
                g_mime_object_write_to_stream(GMIME_OBJECT(inner), nullptr, memory.get());
                GByteArray* array =
                    g_mime_stream_mem_get_byte_array(GMIME_STREAM_MEM(memory.get()));
                if (array && array->len) {
                    attachment.size =
                        bytes_base64({reinterpret_cast<const char*>(array->data), array->len},
                                     attachment.content_base64);
                }
            }
            attachment.name = clean_file_name(file_name(object));
            if (attachment.name.empty()) attachment.name = "forwarded-message.eml";
        } else if (GMIME_IS_PART(object)) {
            attachment.content_type = media_type(object);
            attachment.size = content_base64(GMIME_PART(object), attachment.content_base64);
            attachment.name = clean_file_name(file_name(object));
            if (attachment.name.empty())
                attachment.name = "attachment-" + std::to_string(out.size() + 1) + "." +
                                  extension_for(attachment.content_type);
        } else {
            return;  // a bare GMimeObject of no known kind: nothing to carry
        }
        attachment.content_id = clean_utf8(trim(or_empty(g_mime_object_get_content_id(object))));
        out.push_back(std::move(attachment));
    }

    GMimeParserOptions* parser_options_;
    const ConversionOptions& options_;
    std::unordered_set<GMimeObject*> dropped_;
    Selection chosen_;
};

// ---- RFC 2045 default type ----

std::string_view trim_left(std::string_view text) {
    while (!text.empty() && (text.front() == ' ' || text.front() == '\t')) text.remove_prefix(1);
    return text;
}

// RFC 2045 5.2: a syntactically invalid Content-Type means text/plain. GMime makes
// application/octet-stream of "text" without a subtype; such a part becomes text/plain with
// the parameters it declared (charset, name), which GMime reads. Other invalid types stay
// application/octet-stream: a binary part must not become the message text.
void default_text_subtype(GMimeObject* root, GMimeParserOptions* parser_options) {
    std::vector<GMimeObject*> pending{root};
    while (!pending.empty()) {
        GMimeObject* object = pending.back();
        pending.pop_back();
        if (GMIME_IS_MULTIPART(object)) {
            GMimeMultipart* multipart = GMIME_MULTIPART(object);
            for (int i = g_mime_multipart_get_count(multipart) - 1; i >= 0; --i)
                pending.push_back(g_mime_multipart_get_part(multipart, i));
            continue;
        }
        if (!GMIME_IS_PART(object) || media_type(object) != "application/octet-stream") continue;
        const std::string_view value =
            trim(or_empty(g_mime_object_get_header(object, "Content-Type")));
        if (!istarts_with(value, "text")) continue;
        std::string_view parameters = trim_left(value.substr(4));
        if (!parameters.empty() && parameters.front() == '/')
            parameters = trim_left(parameters.substr(1));
        if (!parameters.empty() && parameters.front() != ';') continue;  // not type "text"
        const std::string fixed = "text/plain" + std::string(parameters);
        GObjectPtr<GMimeContentType> type(g_mime_content_type_parse(parser_options, fixed.c_str()));
        if (type) g_mime_object_set_content_type(object, type.get());
    }
}

// ---- the part limit, before GMime builds anything ----

// Calls `visit(line)` for each line of `text`, without its '\n'.
template <class Visit>
void for_each_line(std::string_view text, Visit&& visit) {
    size_t at = 0;
    while (at < text.size()) {
        size_t end = text.find('\n', at);
        if (end == std::string_view::npos) end = text.size();
        visit(text.substr(at, end - at));
        at = end + 1;
    }
}

// GMime takes a line as a delimiter of boundary B when it is "--", B, then only white space
// (" \t\r\n"): the text after "--" without trailing white space is B without it.
std::string_view delimiter_key(std::string_view text) {
    const auto last = text.find_last_not_of(" \t\r\n");
    return last == std::string_view::npos ? std::string_view() : text.substr(0, last + 1);
}

// Where the header field starting at `at` ends: after its line and the folded lines that
// continue it (starting with a blank, as GMime's header parser joins them).
size_t field_end(std::string_view source, size_t at) {
    size_t end = source.find('\n', at);
    while (end != std::string_view::npos && end + 1 < source.size() &&
           (source[end + 1] == ' ' || source[end + 1] == '\t'))
        end = source.find('\n', end + 1);
    return end == std::string_view::npos ? source.size() : end + 1;
}

struct StringHash {
    using is_transparent = void;
    size_t operator()(std::string_view text) const { return std::hash<std::string_view>{}(text); }
};
using BoundarySet = std::unordered_set<std::string, StringHash, std::equal_to<>>;

// The boundaries declared by every Content-Type field anywhere in `source`, each read by GMime
// from the field as GMime's header parser delimits it (name, optional blanks, ':', value with
// its folded lines); body lines that look like such fields only add boundaries, never hide one.
// nullopt past `cap` of them.
std::optional<BoundarySet> declared_boundaries(std::string_view source,
                                               GMimeParserOptions* parser_options, size_t cap) {
    constexpr std::string_view kName = "content-type";
    BoundarySet out;
    size_t at = 0;
    while (at < source.size()) {
        size_t colon = at + kName.size();
        if (!istarts_with(source.substr(at), kName)) {
            const size_t end = source.find('\n', at);
            at = end == std::string_view::npos ? source.size() : end + 1;
            continue;
        }
        while (colon < source.size() && (source[colon] == ' ' || source[colon] == '\t')) ++colon;
        const size_t end = field_end(source, at);
        if (colon < source.size() && source[colon] == ':') {
            // As GMime reads the field for the part (g_mime_header_get_value): unfolded and
            // RFC 2047-decoded as a whole, then parsed.
            const std::string raw(source.substr(colon + 1, end - (colon + 1)));
            GCharPtr unfolded(g_mime_utils_header_unfold(raw.c_str()));
            GCharPtr value(g_mime_utils_header_decode_text(parser_options, unfolded.get()));
            GObjectPtr<GMimeContentType> type(
                g_mime_content_type_parse(parser_options, value.get()));
            const char* boundary =
                type ? g_mime_content_type_get_parameter(type.get(), "boundary") : nullptr;
            if (boundary) {
                out.emplace(delimiter_key(boundary));
                if (out.size() > cap) return std::nullopt;
            }
        }
        at = end;
    }
    return out;
}

// Whether GMime could build more than `max` entities from `source`, known before it builds any.
// GMime starts each child of a multipart at a delimiter line of a boundary in scope, one line
// per child, so the root plus the delimiter lines of the declared boundaries bound the count.
// Lines in bodies may be counted too: over, never under.
bool more_parts_than(std::string_view source, GMimeParserOptions* parser_options, size_t max) {
    // Every line starting with "--" is a bound already; most messages stop here.
    size_t dashes = 0;
    for_each_line(source, [&](std::string_view line) { dashes += line.starts_with("--"); });
    if (dashes < max) return false;
    // Each boundary GMime uses is a multipart of its own: more than `max` is too many.
    const auto boundaries = declared_boundaries(source, parser_options, max);
    if (!boundaries) return true;
    size_t delimiters = 0;
    for_each_line(source, [&](std::string_view line) {
        if (line.starts_with("--") && boundaries->contains(delimiter_key(line.substr(2))))
            ++delimiters;
    });
    return delimiters >= max;
}

// ---- header blocks without their blank line ----

// The lines GMime dropped from header blocks for not being header fields, which it reports
// with their offsets (GMIME_CRIT_INVALID_HEADER_NAME), as the starts of runs of adjacent lines:
// a memory cost per run, not per line. Lines after a stray first line of a block are reported
// at that line's offset, which the run already holds.
struct DroppedLines {
    std::string_view source;
    std::vector<gint64> starts;
    gint64 last_end = -1;  // where the last run ends
};

void note_dropped_line(gint64 offset, GMimeParserWarning warning, const gchar*, gpointer data) {
    auto& dropped = *static_cast<DroppedLines*>(data);
    if (warning != GMIME_CRIT_INVALID_HEADER_NAME || offset < 0 ||
        offset >= static_cast<gint64>(dropped.source.size()))
        return;
    const auto end = static_cast<gint64>(field_end(dropped.source, static_cast<size_t>(offset)));
    if (dropped.starts.empty() || offset < dropped.starts.back() || offset > dropped.last_end)
        dropped.starts.push_back(offset);
    dropped.last_end = std::max(dropped.last_end, end);
}

GObjectPtr<GMimeMessage> parse(GMimeStream* stream, GMimeParserOptions* parser_options,
                               DroppedLines* dropped_lines) {
    if (dropped_lines)
        g_mime_parser_options_set_warning_callback(parser_options, note_dropped_line,
                                                   dropped_lines);
    GObjectPtr<GMimeParser> parser(g_mime_parser_new_with_stream(stream));
    g_mime_parser_set_format(parser.get(), GMIME_FORMAT_MESSAGE);
    GObjectPtr<GMimeMessage> message(g_mime_parser_construct_message(parser.get(), parser_options));
    g_mime_parser_options_set_warning_callback(parser_options, nullptr, nullptr);
    return message;
}

// The stream offsets of every header field GMime kept, sorted.
std::vector<gint64> header_offsets(GMimeMessage* message) {
    std::vector<gint64> out;
    std::vector<GMimeObject*> pending{GMIME_OBJECT(message)};
    while (!pending.empty()) {
        GMimeObject* object = pending.back();
        pending.pop_back();
        GMimeHeaderList* list = g_mime_object_get_header_list(object);
        for (int i = 0, n = list ? g_mime_header_list_get_count(list) : 0; i < n; ++i)
            out.push_back(g_mime_header_get_offset(g_mime_header_list_get_header_at(list, i)));
        if (GMIME_IS_MESSAGE(object)) {
            if (GMimeObject* part = g_mime_message_get_mime_part(GMIME_MESSAGE(object)))
                pending.push_back(part);
        } else if (GMIME_IS_MULTIPART(object)) {
            GMimeMultipart* multipart = GMIME_MULTIPART(object);
            for (int i = 0, n = g_mime_multipart_get_count(multipart); i < n; ++i)
                pending.push_back(g_mime_multipart_get_part(multipart, i));
        } else if (GMIME_IS_MESSAGE_PART(object)) {
            if (GMimeMessage* inner = g_mime_message_part_get_message(GMIME_MESSAGE_PART(object)))
                pending.push_back(GMIME_OBJECT(inner));
        }
    }
    std::sort(out.begin(), out.end());
    return out;
}

// Where blank lines are missing: the first of the dropped lines that no header field follows
// in their header block. Those lines are the text the header block ran into (a part's body
// written right after its fields, a body after the message header). Dropped lines with a
// field after them are broken fields: GMime's dropping them loses no text of the message.
std::vector<gint64> missing_blank_lines(std::string_view source, GMimeMessage* message,
                                        std::vector<gint64> dropped) {
    std::sort(dropped.begin(), dropped.end());
    dropped.erase(std::unique(dropped.begin(), dropped.end()), dropped.end());
    const gint64 size = static_cast<gint64>(source.size());
    const std::vector<gint64> fields = header_offsets(message);
    // GMime ends a header block at an empty line or at a boundary, which starts with "--".
    auto block_ends = [&](gint64 from, gint64 to) {
        const std::string_view gap =
            source.substr(static_cast<size_t>(from), static_cast<size_t>(to - from));
        return gap.find("\n\n") != std::string_view::npos ||
               gap.find("\n\r\n") != std::string_view::npos ||
               gap.find("\n--") != std::string_view::npos;
    };
    std::vector<gint64> out;
    gint64 run = -1;  // the first dropped line of the current header block, or -1
    for (size_t i = 0; i < dropped.size() && dropped[i] < size; ++i) {
        const gint64 at = dropped[i];
        if (run < 0) run = at;
        // Not after but at: GMime dates the field after a stray first line at that line.
        const auto field = std::lower_bound(fields.begin(), fields.end(), at);
        const gint64 next_field = field != fields.end() ? std::min(*field, size) : size;
        const gint64 next_dropped = i + 1 < dropped.size() ? std::min(dropped[i + 1], size) : size;
        const gint64 next = std::min(next_field, next_dropped);
        if (next == size || block_ends(at, next)) {
            out.push_back(run);
            run = -1;
        } else if (next_field <= next_dropped) {
            run = -1;
        }
    }
    return out;
}

// `stream` with an empty line inserted at each offset of `at` (ascending).
GObjectPtr<GMimeStream> with_blank_lines(GMimeStream* stream, const std::vector<gint64>& at) {
    GObjectPtr<GMimeStream> joined(g_mime_stream_cat_new());
    auto add = [&](GMimeStream* piece) {
        g_mime_stream_cat_add_source(GMIME_STREAM_CAT(joined.get()), piece);
        g_object_unref(piece);
    };
    gint64 from = 0;
    for (const gint64 offset : at) {
        if (offset > from) add(g_mime_stream_substream(stream, from, offset));
        add(g_mime_stream_mem_new_with_buffer("\n", 1));
        from = offset;
    }
    add(g_mime_stream_substream(stream, from, -1));
    return joined;
}

// ---- the whole message ----

Result<EmailMessage> convert_parsed(GMimeMessage* message, GMimeParserOptions* parser_options,
                                    const Envelope& envelope, const ConversionOptions& options) {
    EmailMessage out;
    out.user_engagement_tracking_disabled = options.disable_engagement_tracking;
    out.subject = clean_text(g_mime_message_get_subject(message));

    // Recipients: the envelope decides who receives the message; the headers only decide
    // where each of them is shown.
    std::vector<std::string> recipients;
    for (const std::string& raw : envelope.recipients) {
        std::string address = options.rewrite.recipient.apply(envelope_address(raw));
        if (address.empty()) continue;
        if (std::none_of(recipients.begin(), recipients.end(),
                         [&](const std::string& seen) { return iequals(seen, address); }))
            recipients.push_back(std::move(address));
    }
    if (recipients.empty()) return make_error("no envelope recipients");
    std::vector<bool> placed(recipients.size(), false);
    auto place = [&](const std::vector<Mailbox>& shown, std::vector<EmailAddress>& field) {
        for (const Mailbox& mailbox : shown) {
            for (size_t i = 0; i < recipients.size(); ++i) {
                if (!placed[i] && iequals(recipients[i], mailbox.address)) {
                    placed[i] = true;
                    field.push_back({recipients[i], mailbox.name});
                }
            }
        }
    };
    place(mailboxes(message, GMIME_ADDRESS_TYPE_TO, options.rewrite.recipient), out.to);
    place(mailboxes(message, GMIME_ADDRESS_TYPE_CC, options.rewrite.recipient), out.cc);
    for (size_t i = 0; i < recipients.size(); ++i)
        if (!placed[i]) out.bcc.push_back({recipients[i], ""});

    // Sender: only verified domains may send through ACS.
    const std::vector<Mailbox> from =
        mailboxes(message, GMIME_ADDRESS_TYPE_FROM, options.rewrite.sender);
    const std::vector<Mailbox> reply_to =
        mailboxes(message, GMIME_ADDRESS_TYPE_REPLY_TO, options.rewrite.sender);
    std::string original;
    if (options.sender_source == SenderSource::header) {
        if (!from.empty()) original = from.front().address;
    } else {
        // "" for the null sender
        original = options.rewrite.sender.apply(envelope_address(envelope.sender));
    }
    for (const Mailbox& mailbox : reply_to) out.reply_to.push_back(to_email_address(mailbox));
    if (!original.empty() && in_verified_domain(original, options.verified_domains)) {
        out.sender_address = original;
    } else {
        if (trim(options.sender).empty())
            return make_error("sender <" + original +
                              "> is not in a verified domain and no sender is configured");
        out.sender_address = std::string(trim(options.sender));
        // Replies should still reach the real author.
        if (out.reply_to.empty() && options.reply_to_original) {
            if (!from.empty())
                out.reply_to.push_back(to_email_address(from.front()));
            else if (!original.empty())
                out.reply_to.push_back({original, ""});
        }
    }

    out.headers = pass_through_headers(message, options);

    GMimeObject* root = g_mime_message_get_mime_part(message);
    if (root) {
        Converter converter(parser_options, options);
        if (converter.too_many_parts(root))
            return make_error(ErrorKind::too_many_mime_parts, std::string(kTooManyMimeParts));
        default_text_subtype(root, parser_options);
        converter.convert(root, out);
    }
    // ACS requires content.subject and at least one of plainText/html: a message without any
    // text (only attachments, or nothing at all) is sent with an empty plain text.
    if (!out.plain_text && !out.html) out.plain_text = std::string();
    return out;
}

// `stream` is what GMime parses, `source` the same bytes for the scans GMime cannot do;
// `mapped`: `source` is a read-only mapping of a file (the spool).
Result<EmailMessage> convert_source(std::string_view source, GMimeStream* stream,
                                    const Envelope& envelope, const ConversionOptions& options,
                                    bool mapped = false) {
    ParserOptionsPtr parser_options = make_parser_options();
    if (more_parts_than(source, parser_options.get(), options.max_mime_parts))
        return make_error(ErrorKind::too_many_mime_parts, std::string(kTooManyMimeParts));
    // The scan made every page of the mapping resident; GMime reads the file through `stream`
    // and only a few lines of `source` are looked at again (faulted back in from the page
    // cache). Left resident, a large message would count twice while converted: its source
    // and its attachments' base64.
    if (mapped && !source.empty())
        ::madvise(const_cast<char*>(source.data()), source.size(), MADV_DONTNEED);
    DroppedLines dropped{source, {}};
    GObjectPtr<GMimeMessage> message = parse(stream, parser_options.get(), &dropped);
    if (message && !dropped.starts.empty()) {
        const std::vector<gint64> blank_lines =
            missing_blank_lines(source, message.get(), std::move(dropped.starts));
        // Text GMime would drop: parse again with the blank lines GMime expected where it met it.
        if (!blank_lines.empty()) {
            GObjectPtr<GMimeStream> repaired = with_blank_lines(stream, blank_lines);
            message = parse(repaired.get(), parser_options.get(), nullptr);
        }
    }
    if (!message) return make_error("not a MIME message (GMime could not parse it)");
    return convert_parsed(message.get(), parser_options.get(), envelope, options);
}

// A message touching every kind of entity, charset filter and decoder used above.
constexpr std::string_view kWarmUpMessage =
    "From: =?ISO-8859-1?Q?J=F6rg?= <a@example.net>\nTo: a@example.net\nSubject: =?UTF-8?B?dw==?=\n"
    "MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=m\n\n"
    "--m\nContent-Type: multipart/alternative; boundary=a\n\n"
    "--a\nContent-Type: text/plain; charset=iso-8859-1\nContent-Transfer-Encoding: "
    "quoted-printable\n\n"
    "=E9\n--a\nContent-Type: text/html\nContent-Transfer-Encoding: base64\n\nPGI+PC9iPg==\n--a--\n"
    "--m\nContent-Type: message/rfc822\n\nSubject: inner\n\ninner\n"
    "--m\nContent-Type: application/pdf; name=a.pdf\n\n\xe9\n--m--\n";

}  // namespace

void init_gmime_once() {
    static std::once_flag once;
    std::call_once(once, [] {
        // g_mime_init is not thread-safe itself; GMime work on separate objects is afterwards.
        // Never shut down: the milter converts until the process exits.
        g_mime_init();
        // GLib and GMime build type classes and charset tables lazily on first use, under
        // their own locks; one conversion here does it once, ordered before every caller.
        Envelope envelope{"", {"a@example.net"}};
        ConversionOptions options;
        options.sender = "a@example.net";
        GObjectPtr<GMimeStream> stream(
            g_mime_stream_mem_new_with_buffer(kWarmUpMessage.data(), kWarmUpMessage.size()));
        (void)convert_source(kWarmUpMessage, stream.get(), envelope, options);
    });
}

Result<EmailMessage> convert_message(std::string_view source, const Envelope& envelope,
                                     const ConversionOptions& options) {
    init_gmime_once();
    // GMime's memory stream copies the buffer: the string_view need not outlive this call
    // anyway, and the parser keeps referencing the stream for part contents.
    GObjectPtr<GMimeStream> stream(g_mime_stream_mem_new_with_buffer(source.data(), source.size()));
    return convert_source(source, stream.get(), envelope, options);
}

Result<EmailMessage> convert_message_file(const std::string& path, const Envelope& envelope,
                                          const ConversionOptions& options) {
    struct File {
        int fd;
        ~File() {
            if (fd >= 0) ::close(fd);
        }
    } file{::open(path.c_str(), O_RDONLY | O_CLOEXEC)};
    if (file.fd < 0) return make_error(std::strerror(errno), path);
    return convert_message_fd(file.fd, envelope, options);
}

Result<EmailMessage> convert_message_fd(int fd, const Envelope& envelope,
                                        const ConversionOptions& options) {
    init_gmime_once();
    struct stat status {};
    if (::fstat(fd, &status) != 0)
        return make_error(std::string("cannot read the message: ") + std::strerror(errno));
    const auto size = static_cast<size_t>(status.st_size);
    MappedFile file;
    if (auto mapped = file.map(fd, size); !mapped) return mapped.error();
    // GMime's stream closes its descriptor: give it a duplicate. Bounded reads seek from offset
    // 0, whatever offset the descriptor (shared with the duplicate) has; a seekable file stream
    // lets the parser keep offsets into it instead of copying part contents.
    const int own = ::fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (own < 0) return make_error(std::string("cannot read the message: ") + std::strerror(errno));
    GObjectPtr<GMimeStream> stream(
        g_mime_stream_fs_new_with_bounds(own, 0, static_cast<gint64>(size)));
    return convert_source(file.view(), stream.get(), envelope, options, true);
}

}  // namespace paasmilter
