#pragma once

#include <string>

namespace paasmilter {

struct DaemonOptions {
    std::string config_path;
    bool foreground = false;  // log to stderr instead of syslog
    bool debug = false;
};

// Runs the milter until SIGTERM/SIGINT. Returns the process exit code.
int run_daemon(const DaemonOptions& options);

}  // namespace paasmilter
