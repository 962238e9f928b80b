// Logging to syslog (mail facility, next to Postfix's own lines) or to stderr in the
// foreground. The target is chosen once at start-up, before any thread exists.
#pragma once

#include <string_view>

#include <fmt/format.h>

namespace paasmilter {

enum class LogLevel { error, warning, info, debug };
enum class LogTarget { syslog, stderr_stream };

void log_open(LogTarget target, bool debug);
void log_message(LogLevel level, std::string_view message);

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
