#include "daemon.hpp"

#include <libmilter/mfapi.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <thread>

#include "callbacks.hpp"
#include "config_snapshot.hpp"
#include "paasmilter/log.hpp"

namespace paasmilter {

namespace {

// How long SIGTERM waits for messages in progress (well under Postfix's 300 s content
// timeout, and under systemd's default 90 s stop timeout).
constexpr std::chrono::seconds kShutdownGrace{30};

// libmilter starts its own signal thread that sigwait()s for SIGHUP, SIGTERM and SIGINT and
// treats SIGHUP as "stop". We keep those signals for ourselves: the main thread sigwait()s
// for them itself, and Linux hands a process-directed signal to the thread it was sent to
// (the main thread) whenever that thread is waiting for it. The main thread therefore never
// does slow work: a reload runs on its own thread. SIGUSR1 is our internal "libmilter's
// loop ended" wake-up.
sigset_t handled_signals() {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGHUP);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGUSR1);
    return set;
}

// libmilter writes a reply in several small packets and gives us no handle on its sockets:
// with Nagle's algorithm and the MTA's delayed ACKs that stalls every message ~40 ms over
// TCP. Linux copies TCP_NODELAY from a listening socket to the sockets it accepts, so set
// it on the listener libmilter opened (the only listening TCP socket of this process).
void disable_nagle_on_listener() {
    for (int fd = 0; fd < 1024; ++fd) {
        int listening = 0;
        socklen_t length = sizeof listening;
        if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &length) != 0 || !listening) {
            continue;
        }
        sockaddr_storage address{};
        socklen_t address_length = sizeof address;
        if (getsockname(fd, reinterpret_cast<sockaddr*>(&address), &address_length) != 0) continue;
        if (address.ss_family != AF_INET && address.ss_family != AF_INET6) continue;
        int on = 1;
        if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on) != 0) {
            log_warning("cannot set TCP_NODELAY on the milter socket: {}", std::strerror(errno));
        }
    }
}

class Reloader {
  public:
    explicit Reloader(std::string path) : path_(std::move(path)), thread_([this] { loop(); }) {}
    ~Reloader() {
        {
            std::lock_guard lock(mutex_);
            stopping_ = true;
        }
        wake_.notify_one();
        thread_.join();
    }
    void request() {
        {
            std::lock_guard lock(mutex_);
            pending_ = true;
        }
        wake_.notify_one();
    }

  private:
    void loop() {
        std::unique_lock lock(mutex_);
        for (;;) {
            wake_.wait(lock, [this] { return pending_ || stopping_; });
            if (stopping_) return;
            pending_ = false;
            lock.unlock();
            reload();
            lock.lock();
        }
    }

    void reload() {
        auto loaded = load_config(path_);
        if (!loaded) {
            log_error("reload refused, the running configuration stays in force: {}",
                      loaded.error().to_string());
            return;
        }
        auto old = config_snapshot().get();
        if (old && old->socket != (*loaded)->socket) {
            log_warning(
                "reload: milter.socket changed to {}; a restart is needed to listen "
                "there (still on {})",
                (*loaded)->socket, old->socket);
        }
        config_snapshot().set(std::move(*loaded));
        auto now = config_snapshot().get();
        log_info("configuration reloaded from {}: {} routes, {} rules, mode {}", path_,
                 now->routes.size(), now->rules.size(), to_string(now->mode));
    }

    std::string path_;
    std::mutex mutex_;
    std::condition_variable wake_;
    bool pending_ = false;
    bool stopping_ = false;
    std::thread thread_;  // last: started after the fields it uses exist
};

}  // namespace

int run_daemon(const DaemonOptions& options) {
    log_open(options.foreground ? LogTarget::stderr_stream : LogTarget::syslog, options.debug);
    auto loaded = load_config(options.config_path);
    if (!loaded) {
        log_error("{}", loaded.error().to_string());
        return 1;
    }
    std::string socket = (*loaded)->socket;
    config_snapshot().set(std::move(*loaded));

    // Block our signals before any thread exists, so every thread inherits the mask.
    sigset_t signals = handled_signals();
    pthread_sigmask(SIG_BLOCK, &signals, nullptr);

    smfiDesc description = milter_description();
    if (smfi_register(description) != MI_SUCCESS) {
        log_error("smfi_register failed");
        return 1;
    }
    if (smfi_setconn(socket.data()) != MI_SUCCESS) {
        log_error("invalid milter socket {}", socket);
        return 1;
    }
    // Postfix needs to connect to a unix socket: group-writable, and a stale socket from a
    // previous run is removed (smfi_opensocket(true)).
    mode_t old_umask = umask(0007);
    bool opened = smfi_opensocket(true) == MI_SUCCESS;
    umask(old_umask);
    if (!opened) {
        log_error("cannot listen on {} (in use, or no permission?)", socket);
        return 1;
    }

    if (socket.starts_with("inet")) disable_nagle_on_listener();

    Reloader reloader(options.config_path);
    std::atomic<bool> stop_requested{false};
    std::atomic<int> milter_result{MI_SUCCESS};
    pthread_t main_thread = pthread_self();
    std::thread milter_thread([&] {
        milter_result = smfi_main();
        // Wake the main thread whether or not we were asked to stop.
        pthread_kill(main_thread, SIGUSR1);
    });
    log_info("listening on {} (config {}, mode {})", socket, options.config_path,
             to_string(config_snapshot().get()->mode));

    for (;;) {
        int signal_number = 0;
        if (sigwait(&signals, &signal_number) != 0) continue;
        if (signal_number == SIGHUP) {
            log_info("SIGHUP: reloading {}", options.config_path);
            reloader.request();
        } else if (signal_number == SIGTERM || signal_number == SIGINT) {
            log_info("{}: shutting down", signal_number == SIGTERM ? "SIGTERM" : "SIGINT");
            stop_requested = true;
            smfi_stop();
        } else if (signal_number == SIGUSR1) {
            break;
        }
    }
    if (!stop_requested) {
        milter_thread.join();
        log_error(
            "libmilter's loop ended unexpectedly (result {}); exiting so the service "
            "manager restarts us",
            milter_result.load());
        return 1;
    }
    // The listening socket is closed; let messages in progress finish (bounded), then go.
    // libmilter's accept loop only notices the stop at its next poll timeout (seconds), and
    // idle MTA connections may stay open for minutes: neither is worth waiting for. An MTA
    // whose connection drops applies milter_default_action (tempfail) to what follows.
    using namespace std::chrono_literals;
    auto deadline = std::chrono::steady_clock::now() + kShutdownGrace;
    while (messages_in_flight() > 0 && std::chrono::steady_clock::now() < deadline) {
        std::this_thread::sleep_for(20ms);
    }
    if (int left = messages_in_flight(); left > 0) {
        log_warning("stopping with {} message(s) still in progress; the MTA tempfails them", left);
    }
    log_info("stopped");
    // Session threads may still be blocked in libmilter: leave without running destructors
    // under them.
    milter_thread.detach();
    std::fflush(nullptr);
    _exit(0);
}

}  // namespace paasmilter
