// Helpers shared by the unit tests that need a shell command or a local HTTPS server.
#pragma once

#include <doctest/doctest.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "temp_dir.hpp"

namespace paasmilter::testing {

// Lowers the file size limit (RLIMIT_FSIZE) of the whole process while alive: writes past
// `bytes` then fail with EFBIG, as on a full disk (SIGXFSZ is ignored meanwhile).
class FileSizeLimit {
  public:
    explicit FileSizeLimit(rlim_t bytes) {
        REQUIRE(::getrlimit(RLIMIT_FSIZE, &saved_) == 0);
        old_handler_ = ::signal(SIGXFSZ, SIG_IGN);
        rlimit lowered = saved_;
        lowered.rlim_cur = bytes;
        REQUIRE(::setrlimit(RLIMIT_FSIZE, &lowered) == 0);
    }
    ~FileSizeLimit() {
        ::setrlimit(RLIMIT_FSIZE, &saved_);
        ::signal(SIGXFSZ, old_handler_);
    }
    FileSizeLimit(const FileSizeLimit&) = delete;
    FileSizeLimit& operator=(const FileSizeLimit&) = delete;

  private:
    rlimit saved_{};
    sighandler_t old_handler_ = SIG_DFL;
};

// Runs a shell command and returns its standard output; the test fails on a non-zero exit.
inline std::string run(const std::string& command) {
    std::string out;
    FILE* pipe = ::popen(command.c_str(), "r");
    REQUIRE(pipe != nullptr);
    char buffer[4096];
    while (size_t n = std::fread(buffer, 1, sizeof buffer, pipe)) out.append(buffer, n);
    const int status = ::pclose(pipe);
    INFO(command);
    REQUIRE(status == 0);
    return out;
}

inline std::string read_all(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
}

// A python3 HTTPS server on 127.0.0.1 with a fresh self-signed certificate (an IP SAN for
// 127.0.0.1); killed when the object goes.
class MockHttpsServer {
  public:
    explicit MockHttpsServer(const char* script) {
        ca_file_ = (dir_.path() / "cert.pem").string();
        const std::string key = (dir_.path() / "key.pem").string();
        run("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout " +
            key + " -out " + ca_file_ +
            " -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 -days 2 2>/dev/null");
        const std::string script_file = dir_.write("server.py", script);

        int out[2];
        REQUIRE(::pipe(out) == 0);
        posix_spawn_file_actions_t actions;
        posix_spawn_file_actions_init(&actions);
        posix_spawn_file_actions_adddup2(&actions, out[1], STDOUT_FILENO);
        posix_spawn_file_actions_addclose(&actions, out[0]);
        posix_spawn_file_actions_addclose(&actions, out[1]);
        std::vector<std::string> args = {"python3", script_file, ca_file_, key};
        std::vector<char*> argv;
        for (auto& arg : args) argv.push_back(arg.data());
        argv.push_back(nullptr);
        const int spawned = posix_spawnp(&pid_, "python3", &actions, nullptr, argv.data(), environ);
        posix_spawn_file_actions_destroy(&actions);
        ::close(out[1]);
        REQUIRE(spawned == 0);

        // The script prints its port once it listens.
        std::string line;
        pollfd poller{out[0], POLLIN, 0};
        while (line.find('\n') == std::string::npos && ::poll(&poller, 1, 10'000) == 1) {
            char buffer[64];
            const ssize_t n = ::read(out[0], buffer, sizeof buffer);
            if (n <= 0) break;
            line.append(buffer, static_cast<size_t>(n));
        }
        ::close(out[0]);
        port_ = std::atoi(line.c_str());
        if (port_ <= 0) stop();
        REQUIRE(port_ > 0);
    }
    ~MockHttpsServer() { stop(); }
    MockHttpsServer(const MockHttpsServer&) = delete;
    MockHttpsServer& operator=(const MockHttpsServer&) = delete;

    std::string url(const std::string& path) const {
        return "https://127.0.0.1:" + std::to_string(port_) + path;
    }
    const std::string& ca_file() const { return ca_file_; }
    int port() const { return port_; }

  private:
    void stop() {
        if (pid_ <= 0) return;
        ::kill(pid_, SIGKILL);
        ::waitpid(pid_, nullptr, 0);
        pid_ = -1;
    }

    TempDir dir_;
    std::string ca_file_;
    pid_t pid_ = -1;
    int port_ = 0;
};

}  // namespace paasmilter::testing
