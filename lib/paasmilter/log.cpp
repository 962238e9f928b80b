#include "paasmilter/log.hpp"

#include <syslog.h>

#include <atomic>
#include <cstdio>
#include <ctime>
#include <mutex>

#include <nlohmann/json.hpp>

namespace paasmilter {

namespace {
// Written once in log_open() before threads start; atomics keep later reads race-free.
std::atomic<LogTarget> g_target{LogTarget::stderr_stream};
std::atomic<bool> g_debug{false};
std::atomic<bool> g_verbose{false};
std::atomic<LogFormat> g_format{LogFormat::text};
std::mutex g_stderr_mutex;

const char* level_name(LogLevel level) {
    switch (level) {
        case LogLevel::error:
            return "error";
        case LogLevel::warning:
            return "warning";
        case LogLevel::info:
            return "info";
        case LogLevel::debug:
            return "debug";
    }
    return "info";
}

int syslog_priority(LogLevel level) {
    switch (level) {
        case LogLevel::error:
            return LOG_ERR;
        case LogLevel::warning:
            return LOG_WARNING;
        case LogLevel::info:
            return LOG_INFO;
        case LogLevel::debug:
            return LOG_DEBUG;
    }
    return LOG_INFO;
}

std::string utc_timestamp() {
    std::time_t now = std::time(nullptr);
    std::tm tm{};
    gmtime_r(&now, &tm);
    char stamp[32];
    std::strftime(stamp, sizeof stamp, "%Y-%m-%dT%H:%M:%SZ", &tm);
    return stamp;
}

// Writes one finished line (without its level prefix for syslog, which has priorities).
void emit(LogLevel level, std::string_view line) {
    if (g_target == LogTarget::syslog) {
        const char* prefix =
            level == LogLevel::info || g_format == LogFormat::json ? "" : level_name(level);
        syslog(syslog_priority(level), "%s%s%.*s", prefix, *prefix ? ": " : "",
               static_cast<int>(line.size()), line.data());
        return;
    }
    std::lock_guard lock(g_stderr_mutex);
    if (g_format == LogFormat::json) {
        std::fprintf(stderr, "%.*s\n", static_cast<int>(line.size()), line.data());
    } else {
        std::fprintf(stderr, "%s paas-milter %s: %.*s\n", utc_timestamp().c_str(),
                     level_name(level), static_cast<int>(line.size()), line.data());
    }
    std::fflush(stderr);
}

// One JSON object: time, level, program, then queue_id, message and fields. Invalid UTF-8
// (client-supplied text is sanitized already) is replaced rather than thrown on.
std::string json_line(LogLevel level, std::string_view queue_id, std::string_view message,
                      const LogFields& fields) {
    nlohmann::ordered_json line;
    line["time"] = utc_timestamp();
    line["level"] = level_name(level);
    line["program"] = "paas-milter";
    if (!queue_id.empty()) line["queue_id"] = std::string(queue_id);
    line["message"] = std::string(message);
    for (const auto& [name, value] : fields) line[name] = value;
    return line.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

}  // namespace

void log_open(const LogOptions& options) {
    g_target = options.target;
    g_debug = options.debug;
    g_verbose = options.verbose;
    g_format = options.format;
    if (options.target == LogTarget::syslog) openlog("paas-milter", LOG_PID | LOG_NDELAY, LOG_MAIL);
}

bool parse_log_format(std::string_view text, LogFormat& format) {
    if (text == "text") {
        format = LogFormat::text;
    } else if (text == "json") {
        format = LogFormat::json;
    } else {
        return false;
    }
    return true;
}

bool log_verbose_enabled() {
    return g_verbose;
}

void log_message(LogLevel level, std::string_view message) {
    if (level == LogLevel::debug && !g_debug) return;
    if (g_format == LogFormat::json) return emit(level, json_line(level, {}, message, {}));
    emit(level, message);
}

void log_for(LogLevel level, std::string_view queue_id, std::string_view message,
             const LogFields& fields) {
    if (level == LogLevel::debug && !g_debug) return;
    if (g_format == LogFormat::json)
        return emit(level, json_line(level, queue_id, message, fields));
    emit(level, fmt::format("{}: {}", queue_id, message));
}

std::string sanitize_for_log(std::string_view text, size_t limit) {
    std::string out;
    out.reserve(std::min(text.size(), limit) + 8);
    for (unsigned char c : text) {
        if (out.size() >= limit) {
            out += "...";
            break;
        }
        if (c < 0x20 || c >= 0x7f || c == '\\') {
            out += fmt::format("\\x{:02x}", c);
        } else {
            out += static_cast<char>(c);
        }
    }
    return out;
}

}  // namespace paasmilter
