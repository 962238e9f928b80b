// Microsoft Graph, MIME route: see graph_mime.hpp for what this does and does not do.
// GMime reads (and, for the fields that change, writes) addresses and MIME structure; the only
// text handled here is the header section's division into fields and lines.
#include "paasmilter/providers/graph_mime.hpp"
#include "paasmilter/mapped_file.hpp"

#include <gmime/gmime.h>
#include <sys/mman.h>
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <memory>
#include <mutex>
#include <type_traits>
#include <utility>

#include "paasmilter/c_handle.hpp"
#include "paasmilter/gmime_support.hpp"
#include "paasmilter/mime_convert.hpp"  // kTooManyMimeParts
#include "paasmilter/text.hpp"

namespace paasmilter::graph {
namespace {

// ---- RAII for GLib/GMime objects (c_handle.hpp) ----

template <class T>
using GObjectPtr = std::unique_ptr<T, Deleter<g_object_unref>>;
using GCharPtr = std::unique_ptr<char, Deleter<g_free>>;
using FormatOptionsPtr = std::unique_ptr<GMimeFormatOptions, Deleter<g_mime_format_options_free>>;

struct GStringFree {
    void operator()(GString* text) const noexcept { g_string_free(text, TRUE); }
};
using GStringPtr = std::unique_ptr<GString, GStringFree>;

FormatOptionsPtr make_format_options(std::string_view line_end) {
    FormatOptionsPtr options(g_mime_format_options_new());
    g_mime_format_options_set_newline_format(
        options.get(), line_end == "\n" ? GMIME_NEWLINE_FORMAT_UNIX : GMIME_NEWLINE_FORMAT_DOS);
    return options;
}

std::string_view or_empty(const char* text) {
    return text ? std::string_view(text) : std::string_view();
}

std::string_view trim(std::string_view text) {
    const char* blanks = " \t\r\n";
    const auto first = text.find_first_not_of(blanks);
    if (first == std::string_view::npos) return {};
    return text.substr(first, text.find_last_not_of(blanks) - first + 1);
}

// ---- the header section, field by field ----

constexpr std::string_view kCrlf = "\r\n";
constexpr std::string_view kLf = "\n";

struct RawField {
    size_t begin = 0;           // offset of its first byte
    size_t end = 0;             // offset just after its last line end
    std::string_view name;      // empty for a line that is not "name: value"
    std::string_view value;     // after the ':', folds included, without the final line end
    std::string_view line_end;  // of its last line: "\r\n", "\n", or "" at the end of input
};

struct HeaderSection {
    std::vector<RawField> fields;
    size_t fields_end = 0;  // where the empty line that ends the section starts (or the end)
};

size_t next_line(std::string_view source, size_t at) {
    const size_t newline = source.find('\n', at);
    return newline == std::string_view::npos ? source.size() : newline + 1;
}

std::string_view line_end_of(std::string_view text) {
    if (text.ends_with(kCrlf)) return kCrlf;
    if (text.ends_with(kLf)) return kLf;
    return {};
}

// Only what every reader takes for an empty line; anything else ("\r\r\n") keeps the section
// going, so that no reader finds fields where this splitter saw the body.
bool is_empty_line(std::string_view line) {
    return line == kLf || line == kCrlf || line == "\r";
}

bool is_blank(char c) {
    return c == ' ' || c == '\t';
}

// RFC 5322 3.6.8: printable US-ASCII except ':'.
bool valid_field_name(std::string_view name) {
    return !name.empty() && std::all_of(name.begin(), name.end(),
                                        [](char c) { return c > 32 && c < 127 && c != ':'; });
}

// RFC 5322 2.2 and 3.2.2 (obs-fold included): a field is a line that does not start with a
// blank and the lines starting with a blank after it; the first empty line ends the section.
// "Name : value" (blanks before the colon, RFC 5322 4.5) names "Name", as GMime reads it.
HeaderSection split_header_section(std::string_view source) {
    HeaderSection section;
    size_t at = 0;
    while (at < source.size()) {
        size_t next = next_line(source, at);
        if (is_empty_line(source.substr(at, next - at))) break;
        while (next < source.size() && is_blank(source[next])) next = next_line(source, next);
        RawField field;
        field.begin = at;
        field.end = next;
        const std::string_view text = source.substr(at, next - at);
        field.line_end = line_end_of(text);
        const std::string_view content = text.substr(0, text.size() - field.line_end.size());
        if (const auto colon = content.find(':'); colon != std::string_view::npos) {
            std::string_view name = content.substr(0, colon);
            while (!name.empty() && is_blank(name.back())) name.remove_suffix(1);
            if (valid_field_name(name)) {
                field.name = name;
                field.value = content.substr(colon + 1);
            }
        }
        section.fields.push_back(field);
        at = next;
    }
    section.fields_end = at;
    return section;
}

bool name_matches(std::string_view name, std::string_view pattern) {
    if (!pattern.empty() && pattern.back() == '*') {
        const std::string_view prefix = pattern.substr(0, pattern.size() - 1);
        return name.size() >= prefix.size() && iequals(name.substr(0, prefix.size()), prefix);
    }
    return iequals(name, pattern);
}

bool never_passed(std::string_view name, const std::vector<std::string>& never_pass) {
    return std::any_of(never_pass.begin(), never_pass.end(),
                       [&](const std::string& pattern) { return name_matches(name, pattern); });
}

enum class FieldRole {
    other,
    shown_recipients,   // To, Cc: narrowed, and they place envelope recipients
    resent_recipients,  // Resent-To, Resent-Cc: narrowed only
    blind_recipients,   // Bcc, Resent-Bcc: replaced
    message_id,
};

FieldRole role_of(std::string_view name) {
    if (iequals(name, "To") || iequals(name, "Cc")) return FieldRole::shown_recipients;
    if (iequals(name, "Resent-To") || iequals(name, "Resent-Cc"))
        return FieldRole::resent_recipients;
    if (iequals(name, "Bcc") || iequals(name, "Resent-Bcc")) return FieldRole::blind_recipients;
    if (iequals(name, "Message-ID")) return FieldRole::message_id;
    return FieldRole::other;
}

// ---- addresses ----

// An addr-spec as GMime reads it, and with an IDN domain in its ASCII form.
struct AddressKey {
    std::string addr;
    std::string idn_addr;
};

AddressKey key_of(InternetAddressMailbox* mailbox) {
    return {std::string(or_empty(internet_address_mailbox_get_addr(mailbox))),
            std::string(or_empty(internet_address_mailbox_get_idn_addr(mailbox)))};
}

bool same_address(const AddressKey& a, const AddressKey& b) {
    return (!a.addr.empty() && iequals(a.addr, b.addr)) ||
           (!a.idn_addr.empty() && iequals(a.idn_addr, b.idn_addr));
}

struct EnvelopeRecipient {
    std::string spelling;  // as the envelope has it, without <> and blanks
    AddressKey key;
    GObjectPtr<InternetAddress> mailbox;  // for the Bcc field
    bool shown = false;                   // a To/Cc of the submitted copy names it
};

// "<user@example.com>" or " user@example.com " -> "user@example.com".
std::string_view bare_address(std::string_view raw) {
    std::string_view address = trim(raw);
    if (address.size() >= 2 && address.front() == '<' && address.back() == '>')
        address = trim(address.substr(1, address.size() - 2));
    return address;
}

// The envelope recipients, each once, read by GMime as an angle-addr so that quoting and IDN
// domains compare the way they do in header fields.
std::vector<EnvelopeRecipient> read_envelope(const std::vector<std::string>& raw_recipients,
                                             GMimeParserOptions* parser_options) {
    std::vector<EnvelopeRecipient> out;
    for (const std::string& raw : raw_recipients) {
        const std::string_view spelling = bare_address(raw);
        if (spelling.empty() || spelling.find('\0') != std::string_view::npos) continue;
        EnvelopeRecipient recipient;
        recipient.spelling = std::string(spelling);
        const std::string angle_addr = "<" + recipient.spelling + ">";
        GObjectPtr<InternetAddressList> parsed(
            internet_address_list_parse(parser_options, angle_addr.c_str()));
        if (parsed && internet_address_list_length(parsed.get()) == 1 &&
            INTERNET_ADDRESS_IS_MAILBOX(internet_address_list_get_address(parsed.get(), 0))) {
            InternetAddress* mailbox = internet_address_list_get_address(parsed.get(), 0);
            recipient.mailbox.reset(INTERNET_ADDRESS(g_object_ref(mailbox)));
        } else {
            recipient.mailbox.reset(
                internet_address_mailbox_new(nullptr, recipient.spelling.c_str()));
        }
        recipient.key = key_of(INTERNET_ADDRESS_MAILBOX(recipient.mailbox.get()));
        if (recipient.key.addr.empty()) recipient.key.addr = recipient.spelling;
        if (std::none_of(out.begin(), out.end(), [&](const EnvelopeRecipient& seen) {
                return same_address(seen.key, recipient.key);
            }))
            out.push_back(std::move(recipient));
    }
    return out;
}

// Narrows one address list to the envelope recipients, in place.
class RecipientFilter {
  public:
    RecipientFilter(std::vector<EnvelopeRecipient>& envelope, bool places_recipients,
                    std::vector<size_t>& visible_order)
        : envelope_(envelope),
          places_recipients_(places_recipients),
          visible_order_(visible_order) {}

    void narrow(InternetAddressList* list, int depth = 0) {
        for (int i = 0; i < internet_address_list_length(list);) {
            InternetAddress* address = internet_address_list_get_address(list, i);
            bool keep = false;
            if (INTERNET_ADDRESS_IS_MAILBOX(address)) {
                const AddressKey key = key_of(INTERNET_ADDRESS_MAILBOX(address));
                at_signs_ += static_cast<size_t>(std::count(key.addr.begin(), key.addr.end(), '@'));
                keep = place(key);
            } else if (INTERNET_ADDRESS_IS_GROUP(address)) {
                // RFC 5322 has no groups within groups; GMime makes none, the bound is for
                // safety only (what is deeper is dropped, which re-renders the field).
                InternetAddressList* members =
                    internet_address_group_get_members(INTERNET_ADDRESS_GROUP(address));
                const int before = internet_address_list_length(members);
                if (depth < kMaxGroupDepth) {
                    narrow(members, depth + 1);
                } else {
                    internet_address_list_clear(members);
                    removed_ += static_cast<size_t>(before);
                }
                // A group that lost all its members goes; one that never had any
                // ("undisclosed-recipients:;") addresses nobody and stays.
                keep = before == 0 || internet_address_list_length(members) > 0;
            }
            if (keep) {
                ++i;
            } else {
                internet_address_list_remove_at(list, i);
                ++removed_;
            }
        }
    }

    size_t removed() const { return removed_; }
    // '@' characters inside the addr-specs GMime read, removed ones included.
    size_t at_signs() const { return at_signs_; }

  private:
    static constexpr int kMaxGroupDepth = 4;

    bool place(const AddressKey& key) {
        for (size_t i = 0; i < envelope_.size(); ++i) {
            if (!same_address(envelope_[i].key, key)) continue;
            if (places_recipients_ && !envelope_[i].shown) {
                envelope_[i].shown = true;
                visible_order_.push_back(i);
            }
            return true;
        }
        return false;
    }

    std::vector<EnvelopeRecipient>& envelope_;
    bool places_recipients_;
    std::vector<size_t>& visible_order_;
    size_t removed_ = 0;
    size_t at_signs_ = 0;
};

// Rewrites the domain of every mailbox of `list` (group members too) by `map`; returns how
// many changed.
size_t rewrite_addresses(InternetAddressList* list, const DomainMap& map, int depth = 0) {
    if (map.empty() || !list || depth > 4) return 0;
    size_t changed = 0;
    for (int i = 0; i < internet_address_list_length(list); ++i) {
        InternetAddress* address = internet_address_list_get_address(list, i);
        if (INTERNET_ADDRESS_IS_MAILBOX(address)) {
            InternetAddressMailbox* mailbox = INTERNET_ADDRESS_MAILBOX(address);
            const std::string_view addr = or_empty(internet_address_mailbox_get_addr(mailbox));
            if (auto rewritten = map.rewrite(addr)) {
                internet_address_mailbox_set_addr(mailbox, rewritten->c_str());
                ++changed;
            }
        } else if (INTERNET_ADDRESS_IS_GROUP(address)) {
            changed += rewrite_addresses(
                internet_address_group_get_members(INTERNET_ADDRESS_GROUP(address)), map,
                depth + 1);
        }
    }
    return changed;
}

bool is_sender_field(std::string_view name) {
    return iequals(name, "From") || iequals(name, "Sender") || iequals(name, "Reply-To");
}

std::string render_address_field(std::string_view name, InternetAddressList* list,
                                 std::string_view line_end) {
    const FormatOptionsPtr format = make_format_options(line_end);
    GStringPtr text(g_string_new_len(name.data(), static_cast<gssize>(name.size())));
    g_string_append(text.get(), ": ");
    // Folds at 78 columns, RFC 2047-encodes display names that need it, ends with the newline.
    internet_address_list_encode(list, format.get(), text.get());
    return std::string(text->str, text->len);
}

// ---- the preparation ----

enum class Disposition { keep, drop, replace };

struct FieldPlan {
    Disposition disposition = Disposition::keep;
    std::string replacement;
    bool emptied_shown_field = false;  // a To/Cc left without any entry
};

std::string_view preferred_line_end(const HeaderSection& section, std::string_view source) {
    for (auto field = section.fields.rbegin(); field != section.fields.rend(); ++field)
        if (!field->line_end.empty()) return field->line_end;
    const std::string_view blank_line = line_end_of(source.substr(
        section.fields_end, next_line(source, section.fields_end) - section.fields_end));
    return blank_line.empty() ? kCrlf : blank_line;
}

Error too_large(size_t size, size_t limit) {
    return make_error(ErrorKind::too_large, std::string(kMessageTooLarge) + " (" +
                                                std::to_string(size) + " bytes, the limit is " +
                                                std::to_string(limit) + ")");
}

Result<GraphMime> prepare(std::string_view source,
                          const std::vector<std::string>& envelope_recipients,
                          const GraphMimeOptions& options) {
    const ParserOptionsPtr parser_options = make_parser_options();
    std::vector<std::string> rewritten_recipients;
    for (const std::string& raw : envelope_recipients) {
        rewritten_recipients.push_back(options.rewrite.recipient.apply(bare_address(raw)));
    }
    std::vector<EnvelopeRecipient> envelope =
        read_envelope(rewritten_recipients, parser_options.get());
    if (envelope.empty()) return make_error("no envelope recipients");
    if (source.size() > options.max_message_bytes)
        return too_large(source.size(), options.max_message_bytes);

    const HeaderSection section = split_header_section(source);
    const std::string_view section_line_end = preferred_line_end(section, source);
    std::vector<FieldPlan> plans(section.fields.size());
    std::vector<size_t> visible_order;
    std::optional<size_t> bcc_position;  // index of the first Bcc field removed
    bool seen_message_id = false;
    GraphMime out;

    for (size_t i = 0; i < section.fields.size(); ++i) {
        const RawField& field = section.fields[i];
        FieldPlan& plan = plans[i];
        if (field.name.empty()) continue;  // not a field: kept as it is
        if (never_passed(field.name, options.never_pass_headers)) {
            plan.disposition = Disposition::drop;
            continue;
        }
        const FieldRole role = role_of(field.name);
        if (role == FieldRole::blind_recipients) {
            plan.disposition = Disposition::drop;
            if (!bcc_position) bcc_position = i;
            continue;
        }
        // GMime reads C strings: a NUL ends what it sees of the value.
        const std::string value(field.value);
        if (role == FieldRole::message_id) {
            if (seen_message_id) continue;  // the first one is the message's
            seen_message_id = true;
            GCharPtr unfolded(g_mime_utils_header_unfold(value.c_str()));
            GCharPtr id(g_mime_utils_decode_message_id(unfolded.get()));
            if (id && *id.get()) out.internet_message_id = "<" + std::string(id.get()) + ">";
            continue;
        }
        if (role == FieldRole::other && is_sender_field(field.name) &&
            !options.rewrite.sender.empty()) {
            GObjectPtr<InternetAddressList> list(
                internet_address_list_parse(parser_options.get(), value.c_str()));
            if (list && rewrite_addresses(list.get(), options.rewrite.sender) > 0) {
                plan.disposition = Disposition::replace;
                const std::string_view line_end =
                    field.line_end.empty() ? section_line_end : field.line_end;
                plan.replacement = render_address_field(field.name, list.get(), line_end);
            }
            continue;
        }
        if (role != FieldRole::shown_recipients && role != FieldRole::resent_recipients) continue;

        GObjectPtr<InternetAddressList> list(
            internet_address_list_parse(parser_options.get(), value.c_str()));
        if (!list) list.reset(internet_address_list_new());
        const size_t rewritten = rewrite_addresses(list.get(), options.rewrite.recipient);
        RecipientFilter filter(envelope, role == FieldRole::shown_recipients, visible_order);
        filter.narrow(list.get());
        const auto raw_at_signs = static_cast<size_t>(std::count(value.begin(), value.end(), '@'));
        const bool unchanged = rewritten == 0 && filter.removed() == 0 &&
                               raw_at_signs == filter.at_signs() &&
                               value.find('\0') == std::string::npos;
        if (unchanged) continue;
        const std::string_view line_end =
            field.line_end.empty() ? section_line_end : field.line_end;
        if (internet_address_list_length(list.get()) > 0) {
            plan.disposition = Disposition::replace;
            plan.replacement = render_address_field(field.name, list.get(), line_end);
        } else {
            plan.disposition = Disposition::drop;
            plan.emptied_shown_field = role == FieldRole::shown_recipients;
            if (plan.emptied_shown_field)
                plan.replacement =
                    std::string(field.name) + ": undisclosed-recipients:;" + std::string(line_end);
        }
    }

    // No To/Cc left at all, where the client wrote some: the first emptied one states that the
    // recipients are hidden (graph_mime.hpp, rule 2).
    bool shows_any = false;
    for (size_t i = 0; i < plans.size(); ++i)
        if (plans[i].disposition != Disposition::drop &&
            role_of(section.fields[i].name) == FieldRole::shown_recipients)
            shows_any = true;
    if (!shows_any) {
        for (FieldPlan& plan : plans) {
            if (!plan.emptied_shown_field) continue;
            plan.disposition = Disposition::replace;
            break;
        }
    }

    for (const size_t i : visible_order) out.visible_recipients.push_back(envelope[i].spelling);
    GObjectPtr<InternetAddressList> blind(internet_address_list_new());
    for (const EnvelopeRecipient& recipient : envelope) {
        if (recipient.shown) continue;
        out.bcc_recipients.push_back(recipient.spelling);
        internet_address_list_add(blind.get(), recipient.mailbox.get());
    }
    std::string bcc_field;
    if (!out.bcc_recipients.empty()) {
        const std::string_view line_end =
            bcc_position && !section.fields[*bcc_position].line_end.empty()
                ? section.fields[*bcc_position].line_end
                : section_line_end;
        bcc_field = render_address_field("Bcc", blind.get(), line_end);
    }

    std::string& mime = out.mime;
    mime.reserve(source.size() + bcc_field.size());
    for (size_t i = 0; i < section.fields.size(); ++i) {
        const RawField& field = section.fields[i];
        switch (plans[i].disposition) {
            case Disposition::keep:
                mime.append(source.substr(field.begin, field.end - field.begin));
                break;
            case Disposition::replace:
                mime.append(plans[i].replacement);
                break;
            case Disposition::drop:
                break;
        }
        if (bcc_position == i) mime.append(bcc_field);
    }
    if (!bcc_position && !bcc_field.empty()) {
        // Only the last field can lack a line end (input without a blank line and body).
        if (!mime.empty() && mime.back() != '\n') mime.append(section_line_end);
        mime.append(bcc_field);
    }
    for (const auto& [name, value] : options.add_fields) {
        if (!mime.empty() && mime.back() != '\n') mime.append(section_line_end);
        mime.append(name).append(": ").append(value).append(section_line_end);
    }
    mime.append(source.substr(section.fields_end));
    if (mime.size() > options.max_message_bytes)
        return too_large(mime.size(), options.max_message_bytes);
    return out;
}

// ---- detaching large attachments ----

constexpr size_t kMaxEntities = 1000;

std::string media_type(GMimeObject* object) {
    GMimeContentType* type = g_mime_object_get_content_type(object);
    const std::string media =
        ascii_lowercase(or_empty(type ? g_mime_content_type_get_media_type(type) : nullptr));
    const std::string sub =
        ascii_lowercase(or_empty(type ? g_mime_content_type_get_media_subtype(type) : nullptr));
    if (media.empty() || sub.empty()) return "application/octet-stream";
    return media + "/" + sub;
}

// The message text as mime_convert.cpp tells it (body_kind, unnamed): stays in the message.
bool is_message_text(GMimePart* part) {
    GMimeContentDisposition* disposition =
        g_mime_object_get_content_disposition(GMIME_OBJECT(part));
    if (disposition && g_mime_content_disposition_is_attachment(disposition)) return false;
    if (!or_empty(g_mime_part_get_filename(part)).empty()) return false;
    const std::string type = media_type(GMIME_OBJECT(part));
    return type == "text/plain" || type == "text/html";
}

std::string decoded_content(GMimePart* part) {
    GMimeDataWrapper* content = g_mime_part_get_content(part);
    if (!content) return {};
    GObjectPtr<GMimeStream> memory(g_mime_stream_mem_new());
    g_mime_data_wrapper_write_to_stream(content, memory.get());
    GByteArray* bytes = g_mime_stream_mem_get_byte_array(GMIME_STREAM_MEM(memory.get()));
    if (!bytes || bytes->len == 0) return {};
    return std::string(reinterpret_cast<const char*>(bytes->data), bytes->len);
}

size_t count_entities(GMimeObject* root) {
    std::vector<GMimeObject*> pending{root};
    size_t seen = 0;
    while (!pending.empty() && seen <= kMaxEntities) {
        GMimeObject* object = pending.back();
        pending.pop_back();
        ++seen;
        if (GMIME_IS_MULTIPART(object)) {
            GMimeMultipart* multipart = GMIME_MULTIPART(object);
            for (int i = 0, n = g_mime_multipart_get_count(multipart); i < n; ++i)
                pending.push_back(g_mime_multipart_get_part(multipart, i));
        }
    }
    return seen;
}

GObjectPtr<GMimeObject> empty_text_part() {
    GObjectPtr<GMimeTextPart> part(g_mime_text_part_new_with_subtype("plain"));
    g_mime_text_part_set_text(part.get(), "");
    return GObjectPtr<GMimeObject>(GMIME_OBJECT(part.release()));
}

class Detacher {
  public:
    explicit Detacher(size_t max_attachment_bytes) : max_bytes_(max_attachment_bytes) {}

    // Detaches `object` if it is a large attachment; true when it did (the caller removes it).
    bool detach_if_large(GMimeObject* object) {
        if (!GMIME_IS_PART(object) || GMIME_IS_APPLICATION_PKCS7_MIME(object)) return false;
        GMimePart* part = GMIME_PART(object);
        if (is_message_text(part)) return false;
        GMimeDataWrapper* content = g_mime_part_get_content(part);
        if (!content) return false;
        // Decoding never makes content larger (base64, quoted-printable, uuencode shrink it;
        // 7bit, 8bit and binary keep it): a small encoded part needs no decoding to be judged.
        const gint64 encoded = g_mime_stream_length(g_mime_data_wrapper_get_stream(content));
        if (encoded >= 0 && static_cast<size_t>(encoded) <= max_bytes_) return false;
        std::string bytes = decoded_content(part);
        if (bytes.size() <= max_bytes_) return false;

        DetachedAttachment attachment;
        attachment.file_name = std::string(or_empty(g_mime_part_get_filename(part)));
        attachment.content_type = media_type(object);
        attachment.content_id = std::string(or_empty(g_mime_object_get_content_id(object)));
        GMimeContentDisposition* disposition = g_mime_object_get_content_disposition(object);
        attachment.is_inline =
            disposition &&
            iequals(or_empty(g_mime_content_disposition_get_disposition(disposition)), "inline");
        attachment.bytes = std::move(bytes);
        detached_.push_back(std::move(attachment));
        return true;
    }

    void walk(GMimeObject* object) {
        if (!GMIME_IS_MULTIPART(object) || GMIME_IS_MULTIPART_SIGNED(object) ||
            GMIME_IS_MULTIPART_ENCRYPTED(object))
            return;
        GMimeMultipart* multipart = GMIME_MULTIPART(object);
        bool removed_any = false;
        for (int i = 0; i < g_mime_multipart_get_count(multipart);) {
            GMimeObject* child = g_mime_multipart_get_part(multipart, i);
            if (detach_if_large(child)) {
                GObjectPtr<GMimeObject> removed(g_mime_multipart_remove_at(multipart, i));
                removed_any = true;
                continue;
            }
            walk(child);
            ++i;
        }
        if (removed_any && g_mime_multipart_get_count(multipart) == 0) {
            const GObjectPtr<GMimeObject> placeholder = empty_text_part();
            g_mime_multipart_add(multipart, placeholder.get());
        }
    }

    std::vector<DetachedAttachment> take() { return std::move(detached_); }

  private:
    size_t max_bytes_;
    std::vector<DetachedAttachment> detached_;
};

}  // namespace

bool is_message_too_large(const Error& error) {
    return error.kind == ErrorKind::too_large;
}

std::vector<std::string> GraphMime::recipients() const {
    std::vector<std::string> all = visible_recipients;
    all.insert(all.end(), bcc_recipients.begin(), bcc_recipients.end());
    return all;
}

Result<GraphMime> prepare_graph_mime(std::string_view source,
                                     const std::vector<std::string>& envelope_recipients,
                                     const GraphMimeOptions& options) {
    init_gmime_once();
    return prepare(source, envelope_recipients, options);
}

Result<GraphMime> prepare_graph_mime_fd(int fd, const std::vector<std::string>& envelope_recipients,
                                        const GraphMimeOptions& options) {
    init_gmime_once();
    struct stat status {};
    if (::fstat(fd, &status) != 0)
        return make_error(std::string("cannot read the message: ") + std::strerror(errno));
    const auto size = static_cast<size_t>(status.st_size);
    // Refused before the file is mapped (prepare would refuse it too, after the envelope).
    if (size > options.max_message_bytes) return too_large(size, options.max_message_bytes);
    MappedFile file;
    if (auto mapped = file.map(fd, size); !mapped) return mapped.error();
    return prepare(file.view(), envelope_recipients, options);
}

// ---- base64 ----

static_assert(std::is_same_v<gint, int>, "Base64Encoder keeps GLib's gint state in an int");

void Base64Encoder::add(std::string_view bytes, std::string& out) {
    if (bytes.empty()) return;
    const size_t before = out.size();
    // GLib's bound for g_base64_encode_step without line breaks.
    out.resize(before + (bytes.size() / 3 + 1) * 4 + 4);
    const gsize written =
        g_base64_encode_step(reinterpret_cast<const guchar*>(bytes.data()), bytes.size(), FALSE,
                             out.data() + before, &state_, &save_);
    out.resize(before + written);
}

void Base64Encoder::finish(std::string& out) {
    const size_t before = out.size();
    out.resize(before + 8);  // g_base64_encode_close writes at most 4 (+1 with line breaks)
    const gsize written = g_base64_encode_close(FALSE, out.data() + before, &state_, &save_);
    out.resize(before + written);
    state_ = 0;
    save_ = 0;
}

std::string base64_encode_mime(std::string_view mime) {
    std::string out;
    out.reserve(base64_size(mime.size()) + 8);
    Base64Encoder encoder;
    encoder.add(mime, out);
    encoder.finish(out);
    return out;
}

// ---- detaching ----

Result<DetachedMime> detach_large_attachments(std::string_view mime, size_t max_attachment_bytes) {
    init_gmime_once();
    const ParserOptionsPtr parser_options = make_parser_options();
    GObjectPtr<GMimeStream> stream(g_mime_stream_mem_new_with_buffer(mime.data(), mime.size()));
    GObjectPtr<GMimeParser> parser(g_mime_parser_new_with_stream(stream.get()));
    g_mime_parser_set_format(parser.get(), GMIME_FORMAT_MESSAGE);
    GObjectPtr<GMimeMessage> message(
        g_mime_parser_construct_message(parser.get(), parser_options.get()));
    if (!message) return make_error("not a MIME message (GMime could not parse it)");

    Detacher detacher(max_attachment_bytes);
    if (GMimeObject* root = g_mime_message_get_mime_part(message.get())) {
        if (count_entities(root) > kMaxEntities)
            return make_error(ErrorKind::too_many_mime_parts, std::string(kTooManyMimeParts));
        if (detacher.detach_if_large(root)) {
            const GObjectPtr<GMimeObject> placeholder = empty_text_part();
            g_mime_message_set_mime_part(message.get(), placeholder.get());
        } else {
            detacher.walk(root);
        }
    }

    DetachedMime out;
    out.attachments = detacher.take();
    if (out.attachments.empty()) {
        out.mime = std::string(mime);  // nothing to write back: the input, byte for byte
        return out;
    }
    const size_t first_newline = mime.find('\n');
    const bool crlf = first_newline != std::string_view::npos && first_newline > 0 &&
                      mime[first_newline - 1] == '\r';
    const FormatOptionsPtr format = make_format_options(crlf ? kCrlf : kLf);
    GObjectPtr<GMimeStream> written(g_mime_stream_mem_new());
    if (g_mime_object_write_to_stream(GMIME_OBJECT(message.get()), format.get(), written.get()) < 0)
        return make_error("cannot write the message without its attachments");
    GByteArray* bytes = g_mime_stream_mem_get_byte_array(GMIME_STREAM_MEM(written.get()));
    if (bytes && bytes->len)
        out.mime.assign(reinterpret_cast<const char*>(bytes->data), bytes->len);
    return out;
}

}  // namespace paasmilter::graph
