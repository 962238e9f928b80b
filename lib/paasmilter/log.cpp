#include "paasmilter/log.hpp"

#include <syslog.h>

#include <atomic>
#include <cstdio>
#include <ctime>
#include <mutex>

namespace paasmilter {

namespace {
// Written once in log_open() before threads start; atomics keep later reads race-free.
std::atomic<LogTarget> g_target{LogTarget::stderr_stream};
std::atomic<bool> g_debug{false};
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
}  // namespace

void log_open(LogTarget target, bool debug) {
    g_target = target;
    g_debug = debug;
    if (target == LogTarget::syslog) openlog("paas-milter", LOG_PID | LOG_NDELAY, LOG_MAIL);
}

void log_message(LogLevel level, std::string_view message) {
    if (level == LogLevel::debug && !g_debug) return;
    if (g_target == LogTarget::syslog) {
        const char* prefix = level == LogLevel::info ? "" : level_name(level);
        syslog(syslog_priority(level), "%s%s%.*s", prefix, *prefix ? ": " : "",
               static_cast<int>(message.size()), message.data());
        return;
    }
    std::time_t now = std::time(nullptr);
    std::tm tm{};
    gmtime_r(&now, &tm);
    char stamp[32];
    std::strftime(stamp, sizeof stamp, "%Y-%m-%dT%H:%M:%SZ", &tm);
    std::lock_guard lock(g_stderr_mutex);
    std::fprintf(stderr, "%s paas-milter %s: %.*s\n", stamp, level_name(level),
                 static_cast<int>(message.size()), message.data());
    std::fflush(stderr);
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
