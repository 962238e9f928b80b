#include "paasmilter/acs_json.hpp"

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

// The body in two halves around the recipients, which is where the requests of one message
// differ. Keys keep the order the ACS documentation lists them.
struct Halves {
    Json before;  // senderAddress, content
    Json after;   // replyTo, attachments, headers, userEngagementTrackingDisabled
};

Halves render_halves(EmailMessage& message, bool move_attachments) {
    Halves out;
    out.before["senderAddress"] = message.sender_address;
    Json content = {{"subject", message.subject}};
    if (message.plain_text) content["plainText"] = *message.plain_text;
    if (message.html) content["html"] = *message.html;
    out.before["content"] = std::move(content);

    if (!message.reply_to.empty()) out.after["replyTo"] = address_list(message.reply_to);
    if (!message.attachments.empty()) {
        Json attachments = Json::array();
        for (Attachment& attachment : message.attachments) {
            Json item = {{"name", attachment.name}, {"contentType", attachment.content_type}};
            item["contentInBase64"] =
                move_attachments ? std::move(attachment.content_base64) : attachment.content_base64;
            if (!attachment.content_id.empty()) item["contentId"] = attachment.content_id;
            attachments.push_back(std::move(item));
        }
        out.after["attachments"] = std::move(attachments);
    }
    if (!message.headers.empty()) {
        Json headers = Json::object();
        // A JSON object holds one value per name: the first one given wins.
        for (const auto& [name, value] : message.headers)
            if (!headers.contains(name)) headers[name] = value;
        out.after["headers"] = std::move(headers);
    }
    out.after["userEngagementTrackingDisabled"] = message.user_engagement_tracking_disabled;
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
    Halves halves = render_halves(message, true);
    message.attachments.clear();
    before_recipients_ = dump(halves.before);
    halves.before = nullptr;
    before_recipients_.pop_back();  // the closing brace: the recipients follow
    before_recipients_ += R"(,"recipients":)";
    after_recipients_ = dump(halves.after);
    after_recipients_[0] = ',';  // the opening brace: it continues the object
}

std::string AcsRequestRenderer::body(const RecipientChunk& chunk) const {
    std::string recipients = recipients_json(chunk.to, chunk.cc, chunk.bcc);
    std::string out;
    out.reserve(before_recipients_.size() + recipients.size() + after_recipients_.size());
    out += before_recipients_;
    out += recipients;
    out += after_recipients_;
    return out;
}

size_t AcsRequestRenderer::body_size(const RecipientChunk& chunk) const {
    return before_recipients_.size() + recipients_json(chunk.to, chunk.cc, chunk.bcc).size() +
           after_recipients_.size();
}

std::string to_acs_json(const EmailMessage& message) {
    EmailMessage copy = message;
    AcsRequestRenderer renderer(std::move(copy));
    return renderer.body({message.to, message.cc, message.bcc});
}

size_t acs_request_size(const EmailMessage& message) {
    return to_acs_json(message).size();
}

}  // namespace paasmilter
