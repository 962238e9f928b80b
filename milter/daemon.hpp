#pragma once

#include <string>

#include "paasmilter/log.hpp"

namespace paasmilter {

struct DaemonOptions {
    std::string config_path;
    bool foreground = false;  // log to stderr instead of syslog
    bool debug = false;
    bool verbose = false;  // a line per milter stage of every transaction
    LogFormat log_format = LogFormat::text;
};

// Runs the milter until SIGTERM/SIGINT. Returns the process exit code.
int run_daemon(const DaemonOptions& options);

}  // namespace paasmilter
