#include "daemon.hpp"

#include <fcntl.h>
#include <libmilter/mfapi.h>
#include <malloc.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <prometheus/exposer.h>
#include <prometheus/registry.h>
#include <pthread.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <systemd/sd-daemon.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <future>
#include <mutex>
#include <string>
#include <thread>
#include <utility>

#include "api_action.hpp"
#include "callbacks.hpp"
#include "config_snapshot.hpp"
#include "negotiation.hpp"
#include "paasmilter/delivery/posted_requests.hpp"
#include "paasmilter/drain.hpp"
#include "paasmilter/log.hpp"
#include "paasmilter/metrics.hpp"
#include "paasmilter/services.hpp"
#include "paasmilter/unique_fd.hpp"

namespace paasmilter {

namespace {

// Signals. libmilter's smfi_main() starts a thread that sigwait()s for SIGHUP, SIGTERM and
// SIGINT and stops the milter on any of them, SIGHUP included; a sigwait() of our own in the
// main thread competes with it, and loses whenever a signal arrives while the main thread
// is not inside sigwait(). On Linux a process-directed signal goes to the thread it was
// sent to (for kill(pid): the main thread) when that thread does not block it and is
// running or has no signal pending yet; only otherwise does the kernel pick another thread
// that does not block it, and a thread inside sigwait() counts as one (kernel/signal.c,
// complete_signal() and wants_signal()). So the main thread alone leaves these signals
// unblocked, all the time: a real handler, not sigwait(), that only writes the signal number
// to a pipe the main thread reads; SA_NODEFER keeps the signal unblocked while the handler
// runs. Every other thread is created with them blocked. What remains: while the main
// thread is off-CPU with one of them already pending, ANOTHER of them may reach libmilter's
// thread. A second SIGHUP cannot (a pending standard signal is not queued twice), so that
// takes a SIGTERM/SIGINT racing another signal: we are stopping then anyway, and the "loop
// ended" path below drains too.
constexpr int kHandledSignals[] = {SIGHUP, SIGTERM, SIGINT};
// Written to the pipe by the milter thread when smfi_main() returns (no signal is 0).
constexpr unsigned char kMilterLoopEnded = 0;

sigset_t handled_signals() {
    sigset_t set;
    sigemptyset(&set);
    for (int signal_number : kHandledSignals) sigaddset(&set, signal_number);
    return set;
}

// The pipe's write end, for the handler: a signal handler can reach nothing but globals.
// Set once before the handler is installed, which runs only once the main thread unblocked
// the signals; the pipe then lives until _exit().
int g_signal_pipe = -1;

void on_signal(int signal_number) {
    const int saved_errno = errno;
    const auto byte = static_cast<unsigned char>(signal_number);
    // Non-blocking: a full pipe (64 KiB of unread signal numbers) drops this one.
    [[maybe_unused]] const ssize_t written = write(g_signal_pipe, &byte, 1);
    errno = saved_errno;
}

struct SignalPipe {
    UniqueFd read_end;
    UniqueFd write_end;
};

// The pipe, and the handler for kHandledSignals writing to it.
Result<SignalPipe> install_signal_handlers() {
    int fds[2];
    if (pipe2(fds, O_CLOEXEC) != 0)
        return make_error(fmt::format("cannot create a pipe: {}", std::strerror(errno)));
    SignalPipe result{UniqueFd(fds[0]), UniqueFd(fds[1])};
    if (fcntl(fds[1], F_SETFL, O_NONBLOCK) != 0)
        return make_error(fmt::format("cannot set O_NONBLOCK: {}", std::strerror(errno)));
    g_signal_pipe = fds[1];
    struct sigaction action {};
    action.sa_handler = on_signal;
    sigemptyset(&action.sa_mask);  // nothing blocked while the handler runs, not even itself
    action.sa_flags = SA_NODEFER | SA_RESTART;
    for (int signal_number : kHandledSignals) {
        if (sigaction(signal_number, &action, nullptr) != 0) {
            return make_error(
                fmt::format("cannot handle signal {}: {}", signal_number, std::strerror(errno)));
        }
    }
    return result;
}

// Reads what the pipe holds now, waiting at most `timeout` (-1: forever) for something.
std::string read_signals(int fd, int timeout_ms) {
    pollfd wait{fd, POLLIN, 0};
    if (poll(&wait, 1, timeout_ms) <= 0) return {};  // timeout, or EINTR: our own handler
    char buffer[256];
    const ssize_t n = read(fd, buffer, sizeof buffer);
    return n > 0 ? std::string(buffer, static_cast<size_t>(n)) : std::string();
}

// Tells systemd (Type=notify) how we are: READY=1, RELOADING=1, STOPPING=1 and a STATUS= line
// for `systemctl status`. Without $NOTIFY_SOCKET (not under systemd) it does nothing.
void notify_service_manager(const std::string& state) {
    [[maybe_unused]] int sent = sd_notify(0, state.c_str());
}

// HTTP clients and token caches, built beside the configuration and kept across reloads
// whose settings for them did not change.
ServiceRegistry& services() {
    static ServiceRegistry registry;
    return registry;
}

void log_warnings(const Config& config) {
    for (const std::string& warning : config.warnings) log_warning("{}", warning);
}

// The journal of posted API requests (see PostedRequests) is opened once, with the first
// configuration that has an API route: without it a restart could send a message twice.
Result<void> open_journal_for(const Config& config) {
    static std::string opened;  // main thread at start-up, then only the reloader thread
    if (!config.has_api_routes()) return {};
    const std::string directory = state_directory_of(config, std::getenv("STATE_DIRECTORY"));
    if (!opened.empty()) {
        if (opened != directory) {
            log_warning(
                "milter.state_directory changed to {}; a restart is needed to use it "
                "(still {})",
                directory, opened);
        }
        return {};
    }
    auto summary = posted_requests().open_journal(directory + "/posted-requests.journal");
    if (!summary) {
        return make_error(fmt::format(
            "API routes need a state directory the milter can write (milter.state_directory, "
            "systemd's StateDirectory=, or {}): {}",
            directory, summary.error().message));
    }
    opened = directory;
    log_info(
        "posted API requests are recorded in {}/posted-requests.journal ({} from earlier "
        "runs, {} of them left open{})",
        directory, summary->requests, summary->left_open,
        summary->unreadable ? fmt::format(", {} unreadable lines skipped", summary->unreadable)
                            : std::string());
    if (summary->fresh) {
        // Not an error: the first start. But a journal lost or left behind looks the same.
        log_info(
            "the journal of posted API requests is new: requests posted before it cannot be "
            "known, so until it is 6 days old every first attempt asks the service first "
            "(lookup_before_post = \"auto\" skips that lookup only with a complete journal)");
    }
    return {};
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
        notify_service_manager(fmt::format("RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=reloading {}",
                                           monotonic_usec(), path_));
        auto refuse = [this](const std::string& why) {
            log_error("reload refused, the running configuration stays in force: {}", why);
            metrics().reload_refused(std::chrono::system_clock::now());
            notify_service_manager(
                fmt::format("READY=1\nSTATUS=reload refused, the running configuration stays "
                            "in force: {}",
                            sanitize_for_log(why, 200)));
        };
        auto loaded = load_config(path_, &services());
        if (!loaded) return refuse(loaded.error().to_string());
        if (!(*loaded)->metrics_listen.empty() ||
            !config_snapshot().get()->metrics_listen.empty()) {
            if ((*loaded)->metrics_listen != config_snapshot().get()->metrics_listen) {
                log_warning(
                    "reload: metrics.listen changed to \"{}\"; a restart is needed to serve "
                    "metrics there (still \"{}\")",
                    (*loaded)->metrics_listen, config_snapshot().get()->metrics_listen);
            }
        }
        if (auto journal = open_journal_for(**loaded); !journal) {
            return refuse(journal.error().message);
        }
        auto old = config_snapshot().get();
        if (old && old->socket != (*loaded)->socket) {
            log_warning(
                "reload: milter.socket changed to {}; a restart is needed to listen "
                "there (still on {})",
                (*loaded)->socket, old->socket);
        }
        config_snapshot().set(std::move(*loaded));
        metrics().config_loaded(std::chrono::system_clock::now());
        auto now = config_snapshot().get();
        log_info("configuration reloaded from {}: {} routes, {} rules, mode {}", path_,
                 now->routes.size(), now->rules.size(), to_string(now->mode));
        log_warnings(*now);
        notify_service_manager(
            fmt::format("READY=1\nSTATUS=configuration reloaded: {} routes, {} rules, mode {}",
                        now->routes.size(), now->rules.size(), to_string(now->mode)));
    }

    static uint64_t monotonic_usec() {
        return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::microseconds>(
                                         std::chrono::steady_clock::now().time_since_epoch())
                                         .count());
    }

    std::string path_;
    std::mutex mutex_;
    std::condition_variable wake_;
    bool pending_ = false;
    bool stopping_ = false;
    std::thread thread_;  // last: started after the fields it uses exist
};

// Lets the messages in progress finish, for as long as the longest API time budget of the
// configuration in force (a second SIGTERM/SIGINT cuts it short). Returns how many are left.
// Serves the metrics on `listen` ("127.0.0.1:9940") at /metrics through prometheus-cpp's
// embedded server (civetweb); its threads start blocking our signals, as every thread but
// the main one must.
Result<std::unique_ptr<prometheus::Exposer>> serve_metrics(const std::string& listen) {
    try {
        auto exposer = std::make_unique<prometheus::Exposer>(listen, 2);
        exposer->RegisterCollectable(metrics().registry());
        return exposer;
    } catch (const std::exception& e) {
        return make_error(fmt::format("cannot serve metrics on {}: {}", listen, e.what()));
    }
}

int drain(int signal_fd) {
    const auto limit = drain_time(*config_snapshot().get());
    const auto deadline = std::chrono::steady_clock::now() + limit;
    if (int in_flight = messages_in_flight(); in_flight > 0) {
        log_info("waiting up to {} s for {} message(s) in progress", limit.count(), in_flight);
    }
    int reported = -1;
    while (messages_in_flight() > 0 && std::chrono::steady_clock::now() < deadline) {
        if (int in_flight = messages_in_flight(); in_flight != reported) {
            notify_service_manager(
                fmt::format("STATUS=stopping: {} message(s) in progress", in_flight));
            reported = in_flight;
        }
        const std::string signals = read_signals(signal_fd, 20);
        if (signals.find_first_of(std::string{char(SIGTERM), char(SIGINT)}) != std::string::npos) {
            log_warning("signal received again: not waiting any longer");
            break;
        }
    }
    return messages_in_flight();
}

}  // namespace

int run_daemon(const DaemonOptions& options) {
    // Before anything else, and before any thread exists: every thread created from here on
    // inherits the blocked mask; only the main thread unblocks them again (see above).
    const sigset_t signals = handled_signals();
    pthread_sigmask(SIG_BLOCK, &signals, nullptr);
    // A fixed threshold: every block of 1 MiB or more (a large message's attachments) is
    // mapped on its own and goes back to the system when freed. glibc's default threshold
    // rises with each such block freed (up to 32 MiB), after which large messages come from
    // per-thread arenas that keep their pages: after 20 concurrent messages of 25 MB, 110 MB
    // stayed resident instead of 4 (tests/bench/memory.py).
    mallopt(M_MMAP_THRESHOLD, 1 << 20);
    log_open({options.foreground ? LogTarget::stderr_stream : LogTarget::syslog, options.log_format,
              options.debug, options.verbose});
    auto signal_pipe = install_signal_handlers();
    if (!signal_pipe) {
        log_error("{}", signal_pipe.error().message);
        return 1;
    }
    const int signal_fd = signal_pipe->read_end.get();

    auto loaded = load_config(options.config_path, &services());
    if (!loaded) {
        log_error("{}", loaded.error().to_string());
        return 1;
    }
    log_warnings(**loaded);
    if (auto journal = open_journal_for(**loaded); !journal) {
        log_error("{}", journal.error().message);
        return 1;
    }
    std::string socket = (*loaded)->socket;
    std::unique_ptr<prometheus::Exposer> metrics_server;
    if (const std::string& listen = (*loaded)->metrics_listen; !listen.empty()) {
        auto served = serve_metrics(listen);
        if (!served) {
            log_error("{}", served.error().message);
            return 1;
        }
        metrics_server = std::move(*served);
        log_info("metrics on http://{}/metrics", listen);
    }
    config_snapshot().set(std::move(*loaded));
    metrics().config_loaded(std::chrono::system_clock::now());

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

    if (socket.starts_with("inet") && !disable_nagle_on_listener()) {
        log_warning("cannot set TCP_NODELAY on the milter socket: {}", std::strerror(errno));
    }

    Reloader reloader(options.config_path);
    // smfi_stop() waits for libmilter's accept loop, which holds its lock across a select()
    // of up to 5 s (MI_CHK_TIME): call it aside, so that neither the drain nor an idle stop
    // waits for that.
    std::promise<void> stop_listening;
    std::thread stopper([stopping = stop_listening.get_future()] {
        stopping.wait();
        smfi_stop();
    });
    std::atomic<int> milter_result{MI_SUCCESS};
    std::promise<void> unblocked;
    std::thread milter_thread([&, started = unblocked.get_future()] {
        // libmilter's signal thread must not exist before the main thread has unblocked the
        // signals (and so taken any that arrived during start-up).
        started.wait();
        milter_result = smfi_main();
        [[maybe_unused]] const ssize_t written =
            write(signal_pipe->write_end.get(), &kMilterLoopEnded, 1);
    });
    pthread_sigmask(SIG_UNBLOCK, &signals, nullptr);
    unblocked.set_value();
    notify_service_manager(fmt::format("READY=1\nSTATUS=listening on {}", socket));
    log_info("listening on {} (config {}, mode {})", socket, options.config_path,
             to_string(config_snapshot().get()->mode));

    // The main thread only reads the pipe: any slow work (a reload) runs on another thread.
    bool stop_requested = false;
    bool loop_ended = false;
    while (!stop_requested && !loop_ended) {
        const std::string received = read_signals(signal_fd, -1);
        if (received.find(char(SIGHUP)) != std::string::npos) {
            log_info("SIGHUP: reloading {}", options.config_path);
            reloader.request();  // several at once make one reload
        }
        for (const char signal_number : {char(SIGTERM), char(SIGINT)}) {
            if (!stop_requested && received.find(signal_number) != std::string::npos) {
                log_info("{}: shutting down", signal_number == SIGTERM ? "SIGTERM" : "SIGINT");
                notify_service_manager(
                    fmt::format("STOPPING=1\nSTATUS=stopping: {} message(s) in progress",
                                messages_in_flight()));
                stop_requested = true;
                stop_listening.set_value();
            }
        }
        loop_ended = received.find(char(kMilterLoopEnded)) != std::string::npos;
    }
    if (!stop_requested) {
        log_error(
            "libmilter's loop ended unexpectedly (result {}); exiting so the service "
            "manager restarts us",
            milter_result.load());
    }
    // Let messages in progress finish (bounded), then go. libmilter closes its listening
    // socket at its next poll timeout (seconds), and idle MTA connections may stay open for
    // minutes: neither is worth waiting for. An MTA whose connection drops applies
    // milter_default_action (tempfail) to what follows.
    if (int left = drain(signal_fd); left > 0) {
        log_warning("giving up with {} message(s) still in progress; the MTA tempfails them", left);
    }
    log_info("stopped");
    // Session threads may still be blocked in libmilter: leave without running destructors
    // under them.
    milter_thread.detach();
    stopper.detach();
    std::fflush(nullptr);
    _exit(stop_requested ? 0 : 1);
}

}  // namespace paasmilter
