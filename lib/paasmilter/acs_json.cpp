#include "paasmilter/acs_json.hpp"

#include <algorithm>
#include <memory>
#include <utility>

#include <nlohmann/json.hpp>

namespace paasmilter {
namespace {

// ordered_json: keys in the order the ACS documentation lists them, for readable logs.
using Json = nlohmann::ordered_json;

Json address_json(const EmailAddress& address) {
    Json out = {{"address", address.address}};
    if (!address.display_name.empty()) out["displayName"] = address.display_name;
    return out;
}

Json address_list(const std::vector<EmailAddress>& addresses) {
    Json out = Json::array();
    for (const EmailAddress& address : addresses) out.push_back(address_json(address));
    return out;
}

// replace: dump() would throw on invalid UTF-8; ACS must get valid JSON regardless.
std::string dump(const Json& json) {
    return json.dump(-1, ' ', false, Json::error_handler_t::replace);
}

std::string recipients_json(const std::vector<EmailAddress>& to,
                            const std::vector<EmailAddress>& cc,
                            const std::vector<EmailAddress>& bcc) {
    Json recipients = {{"to", address_list(to)}};  // required by the schema, even empty
    if (!cc.empty()) recipients["cc"] = address_list(cc);
    if (!bcc.empty()) recipients["bcc"] = address_list(bcc);
    return dump(recipients);
}

// Base64 needs no JSON escaping: the attachment's text goes into the body as it is, without
// a copy in a JSON tree first (the attachments are most of a large message's bytes).
bool plain_base64(std::string_view text) {
    return std::all_of(text.begin(), text.end(), [](char c) {
        return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
               c == '+' || c == '/' || c == '=';
    });
}

}  // namespace

std::vector<std::string> RecipientChunk::addresses() const {
    std::vector<std::string> out;
    out.reserve(size());
    for (const auto* list : {&to, &cc, &bcc}) {
        for (const auto& address : *list) out.push_back(address.address);
    }
    return out;
}

AcsRequestRenderer::AcsRequestRenderer(EmailMessage message) {
    {
        // Keys in the order the ACS documentation lists them; the recipients go in between.
        // Its own scope: the texts moved into the tree go as soon as they are rendered.
        Json before;
        before["senderAddress"] = message.sender_address;
        Json content = {{"subject", message.subject}};
        if (message.plain_text) content["plainText"] = std::move(*message.plain_text);
        if (message.html) content["html"] = std::move(*message.html);
        before["content"] = std::move(content);
        std::string text = dump(before);
        text.pop_back();  // the closing brace: the recipients follow
        text += R"(,"recipients":)";
        before_recipients_.append(std::move(text));
    }

    std::string text;  // JSON since the last piece
    if (!message.reply_to.empty()) text += R"(,"replyTo":)" + dump(address_list(message.reply_to));
    if (!message.attachments.empty()) {
        text += R"(,"attachments":[)";
        for (size_t i = 0; i < message.attachments.size(); ++i) {
            Attachment& attachment = message.attachments[i];
            if (i > 0) text += ',';
            std::string meta =
                dump(Json{{"name", attachment.name}, {"contentType", attachment.content_type}});
            meta.pop_back();
            text += meta;
            text += R"(,"contentInBase64":)";
            if (plain_base64(attachment.content_base64)) {
                text += '"';
                after_recipients_.append(std::exchange(text, {}));
                after_recipients_.append(
                    std::make_shared<const std::string>(std::move(attachment.content_base64)));
                text += '"';
            } else {
                text += dump(Json(attachment.content_base64));
                std::string().swap(attachment.content_base64);  // escaped above: not needed
            }
            if (!attachment.content_id.empty()) {
                text += R"(,"contentId":)" + dump(Json(attachment.content_id));
            }
            text += '}';
        }
        text += ']';
    }
    if (!message.headers.empty()) {
        Json headers = Json::object();
        // A JSON object holds one value per name: the first one given wins.
        for (const auto& [name, value] : message.headers)
            if (!headers.contains(name)) headers[name] = value;
        text += R"(,"headers":)" + dump(headers);
    }
    text += R"(,"userEngagementTrackingDisabled":)";
    text += message.user_engagement_tracking_disabled ? "true}" : "false}";
    after_recipients_.append(std::move(text));
}

HttpBody AcsRequestRenderer::body(const RecipientChunk& chunk) const {
    HttpBody out = before_recipients_;
    out.append(recipients_json(chunk.to, chunk.cc, chunk.bcc));
    out.append(after_recipients_);
    return out;
}

size_t AcsRequestRenderer::body_size(const RecipientChunk& chunk) const {
    return before_recipients_.size() + recipients_json(chunk.to, chunk.cc, chunk.bcc).size() +
           after_recipients_.size();
}

std::string to_acs_json(const EmailMessage& message) {
    EmailMessage copy = message;
    AcsRequestRenderer renderer(std::move(copy));
    return renderer.body({message.to, message.cc, message.bcc}).str();
}

size_t acs_request_size(const EmailMessage& message) {
    return to_acs_json(message).size();
}

}  // namespace paasmilter
