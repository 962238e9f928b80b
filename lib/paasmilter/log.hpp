// Logging to syslog (mail facility, next to Postfix's own lines) or to stderr in the
// foreground, as plain text lines (Postfix's style) or as one JSON object per line (for
// container log collectors). The target and format are chosen once at start-up, before any
// thread exists. Never a secret, never a message body.
#pragma once

#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <fmt/format.h>

namespace paasmilter {

enum class LogLevel { error, warning, info, debug };
enum class LogTarget { syslog, stderr_stream };
enum class LogFormat { text, json };

struct LogOptions {
    LogTarget target = LogTarget::stderr_stream;
    LogFormat format = LogFormat::text;
    bool debug = false;    // debug lines
    bool verbose = false;  // one line per milter stage of every transaction
};

void log_open(const LogOptions& options);
// "text" or "json"; false for anything else.
bool parse_log_format(std::string_view text, LogFormat& format);

// Named values a line carries besides its text: JSON lines have them as members ("rule",
// "route", "outcome", ...); text lines already say them in the message.
using LogFields = std::vector<std::pair<std::string, std::string>>;

void log_message(LogLevel level, std::string_view message);
// A line about one message: text "QUEUEID: message"; JSON {"queue_id": ..., "message": ...,
// fields...}.
void log_for(LogLevel level, std::string_view queue_id, std::string_view message,
             const LogFields& fields = {});
bool log_verbose_enabled();

template <class... Args>
void log_error(fmt::format_string<Args...> format, Args&&... args) {
    log_message(LogLevel::error, fmt::format(format, std::forward<Args>(args)...));
}
template <class... Args>
void log_warning(fmt::format_string<Args...> format, Args&&... args) {
    log_message(LogLevel::warning, fmt::format(format, std::forward<Args>(args)...));
}
template <class... Args>
void log_info(fmt::format_string<Args...> format, Args&&... args) {
    log_message(LogLevel::info, fmt::format(format, std::forward<Args>(args)...));
}
template <class... Args>
void log_debug(fmt::format_string<Args...> format, Args&&... args) {
    log_message(LogLevel::debug, fmt::format(format, std::forward<Args>(args)...));
}

// Makes client-supplied text safe for one log line: control bytes and non-ASCII bytes are
// written as \xNN, and the result is cut at `limit` bytes.
std::string sanitize_for_log(std::string_view text, size_t limit = 256);

}  // namespace paasmilter
