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

}  // namespace

std::string to_acs_json(const EmailMessage& message) {
    Json body;
    body["senderAddress"] = message.sender_address;

    Json content = {{"subject", message.subject}};
    if (message.plain_text) content["plainText"] = *message.plain_text;
    if (message.html) content["html"] = *message.html;
    body["content"] = std::move(content);

    Json recipients = {{"to", address_list(message.to)}};  // required by the schema, even empty
    if (!message.cc.empty()) recipients["cc"] = address_list(message.cc);
    if (!message.bcc.empty()) recipients["bcc"] = address_list(message.bcc);
    body["recipients"] = std::move(recipients);

    if (!message.reply_to.empty()) body["replyTo"] = address_list(message.reply_to);

    if (!message.attachments.empty()) {
        Json attachments = Json::array();
        for (const Attachment& attachment : message.attachments) {
            Json item = {{"name", attachment.name},
                         {"contentType", attachment.content_type},
                         {"contentInBase64", attachment.content_base64}};
            if (!attachment.content_id.empty()) item["contentId"] = attachment.content_id;
            attachments.push_back(std::move(item));
        }
        body["attachments"] = std::move(attachments);
    }

    if (!message.headers.empty()) {
        Json headers = Json::object();
        // A JSON object holds one value per name: the first one given wins.
        for (const auto& [name, value] : message.headers)
            if (!headers.contains(name)) headers[name] = value;
        body["headers"] = std::move(headers);
    }

    body["userEngagementTrackingDisabled"] = message.user_engagement_tracking_disabled;
    // replace: dump() would throw on invalid UTF-8; ACS must get valid JSON regardless.
    return body.dump(-1, ' ', false, Json::error_handler_t::replace);
}

size_t acs_request_size(const EmailMessage& message) {
    return to_acs_json(message).size();
}

}  // namespace paasmilter
