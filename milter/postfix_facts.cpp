#include "postfix_facts.hpp"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

#include <fmt/format.h>

#include "paasmilter/unique_fd.hpp"

extern char** environ;

namespace paasmilter {
namespace {

constexpr auto kPostconfTimeout = std::chrono::seconds(10);
constexpr size_t kMaxOutput = 16 * 1024 * 1024;  // postconf prints kilobytes
constexpr size_t kMaxTable = 16 * 1024 * 1024;
constexpr const char* kDefaultPostconf = "/usr/sbin/postconf";

std::string errno_text(int error) {
    return std::strerror(error);
}

// posix_spawn_file_actions_t, destroyed with its owner.
class SpawnActions {
  public:
    SpawnActions() { ok_ = posix_spawn_file_actions_init(&actions_) == 0; }
    ~SpawnActions() {
        if (ok_) posix_spawn_file_actions_destroy(&actions_);
    }
    SpawnActions(const SpawnActions&) = delete;
    SpawnActions& operator=(const SpawnActions&) = delete;
    bool ok() const { return ok_; }
    posix_spawn_file_actions_t* get() { return &actions_; }

  private:
    posix_spawn_file_actions_t actions_;
    bool ok_ = false;
};

// A child process: killed and reaped when its owner goes before wait() did.
class Child {
  public:
    explicit Child(pid_t pid) : pid_(pid) {}
    ~Child() {
        if (pid_ <= 0) return;
        ::kill(pid_, SIGKILL);
        while (::waitpid(pid_, nullptr, 0) < 0 && errno == EINTR) {
        }
    }
    Child(const Child&) = delete;
    Child& operator=(const Child&) = delete;

    // The raw wait status.
    Result<int> wait() {
        int status = 0;
        while (::waitpid(pid_, &status, 0) < 0) {
            if (errno != EINTR) return make_error("waitpid: " + errno_text(errno));
        }
        pid_ = -1;
        return status;
    }

  private:
    pid_t pid_;
};

struct Pipe {
    UniqueFd read;
    UniqueFd write;
};

Result<Pipe> make_pipe() {
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) != 0) return make_error("pipe: " + errno_text(errno));
    return Pipe{UniqueFd(fds[0]), UniqueFd(fds[1])};
}

Result<std::string> read_file(const std::string& path) {
    UniqueFd file(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    if (!file) return make_error(errno_text(errno));
    std::string content;
    char chunk[65536];
    for (;;) {
        const ssize_t got = ::read(file.get(), chunk, sizeof chunk);
        if (got == 0) break;
        if (got < 0) {
            if (errno == EINTR) continue;
            return make_error(errno_text(errno));
        }
        content.append(chunk, static_cast<size_t>(got));
        if (content.size() > kMaxTable) return make_error("larger than 16 MiB");
    }
    return content;
}

std::string first_line(std::string_view text) {
    while (!text.empty() && (text.back() == '\n' || text.back() == ' ')) text.remove_suffix(1);
    return std::string(text.substr(0, text.find('\n')));
}

std::string command_line(const std::vector<std::string>& argv) {
    std::string out;
    for (const std::string& arg : argv) {
        if (!out.empty()) out += ' ';
        out += arg;
    }
    return out;
}

// Runs postconf with these arguments; its output, or an error naming the command.
Result<std::string> postconf(const std::string& program, const std::string& config_directory,
                             std::vector<std::string> args) {
    std::vector<std::string> argv = {program};
    if (!config_directory.empty()) {
        argv.push_back("-c");
        argv.push_back(config_directory);
    }
    argv.insert(argv.end(), args.begin(), args.end());
    auto ran = run_program(argv, kPostconfTimeout);
    if (!ran) return make_error(fmt::format("{}: {}", command_line(argv), ran.error().message));
    if (ran->exit_status != 0) {
        return make_error(fmt::format("{} exited with status {}: {}", command_line(argv),
                                      ran->exit_status, first_line(ran->err)));
    }
    return std::move(ran->out);
}

}  // namespace

Result<ProgramOutput> run_program(const std::vector<std::string>& argv,
                                  std::chrono::milliseconds timeout) {
    if (argv.empty()) return make_error("no program to run");
    auto out = make_pipe();
    if (!out) return out.error();
    auto err = make_pipe();
    if (!err) return err.error();

    SpawnActions actions;
    if (!actions.ok() ||
        posix_spawn_file_actions_addopen(actions.get(), STDIN_FILENO, "/dev/null", O_RDONLY, 0) ||
        posix_spawn_file_actions_adddup2(actions.get(), out->write.get(), STDOUT_FILENO) ||
        posix_spawn_file_actions_adddup2(actions.get(), err->write.get(), STDERR_FILENO)) {
        return make_error("posix_spawn_file_actions: out of memory");
    }
    std::vector<char*> args;
    for (const std::string& arg : argv) args.push_back(const_cast<char*>(arg.c_str()));
    args.push_back(nullptr);
    pid_t pid = -1;
    if (const int error =
            ::posix_spawn(&pid, argv[0].c_str(), actions.get(), nullptr, args.data(), environ);
        error != 0) {
        return make_error("cannot run: " + errno_text(error));
    }
    Child child(pid);
    out->write.reset();  // the child holds the write ends now: EOF when it exits
    err->write.reset();

    ProgramOutput result;
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    UniqueFd* fds[] = {&out->read, &err->read};
    std::string* sinks[] = {&result.out, &result.err};
    while (out->read || err->read) {
        const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
            deadline - std::chrono::steady_clock::now());
        if (left.count() <= 0) {
            return make_error(fmt::format("no answer within {} s", timeout.count() / 1000));
        }
        pollfd polled[2];
        nfds_t count = 0;
        int which[2];
        for (int i = 0; i < 2; ++i) {
            if (!*fds[i]) continue;
            polled[count] = pollfd{fds[i]->get(), POLLIN, 0};
            which[count++] = i;
        }
        const int ready = ::poll(polled, count, static_cast<int>(left.count()));
        if (ready < 0) {
            if (errno == EINTR) continue;
            return make_error("poll: " + errno_text(errno));
        }
        for (nfds_t k = 0; k < count; ++k) {
            if (polled[k].revents == 0) continue;
            const int i = which[k];
            char chunk[8192];
            const ssize_t got = ::read(fds[i]->get(), chunk, sizeof chunk);
            if (got < 0 && errno == EINTR) continue;
            if (got <= 0) {
                fds[i]->reset();
                continue;
            }
            sinks[i]->append(chunk, static_cast<size_t>(got));
            if (sinks[i]->size() > kMaxOutput) return make_error("too much output");
        }
    }
    auto status = child.wait();
    if (!status) return status.error();
    if (WIFSIGNALED(*status)) {
        return make_error(fmt::format("killed by signal {}", WTERMSIG(*status)));
    }
    result.exit_status = WIFEXITED(*status) ? WEXITSTATUS(*status) : -1;
    return result;
}

Result<PostfixFacts> gather_postfix_facts(const std::string& program,
                                          const std::string& config_directory,
                                          std::vector<std::string>& notes) {
    PostfixFacts facts;
    auto main_cf = postconf(program, config_directory,
                            {"-x", "queue_directory", "smtpd_milters", "non_smtpd_milters",
                             "milter_default_action", "milter_header_checks", "transport_maps"});
    if (!main_cf) return main_cf.error();
    apply_main_parameters(*main_cf, facts);

    auto master_cf = postconf(program, config_directory, {"-M"});
    if (!master_cf) return master_cf.error();
    facts.smtpd_services = parse_master_services(*master_cf);
    if (!facts.smtpd_services.empty()) {
        auto overrides = postconf(program, config_directory, {"-P", "-x"});
        if (!overrides) return overrides.error();
        apply_service_parameters(*overrides, facts.smtpd_services);
    }

    for (const std::string& spec : split_postfix_list(facts.milter_header_checks)) {
        PostfixTable table{spec, inline_table_content(spec)};
        const std::string type = spec.substr(0, spec.find(':'));
        const std::string path =
            spec.find(':') == std::string::npos ? std::string() : spec.substr(spec.find(':') + 1);
        if (!table.content && (type == "pcre" || type == "regexp") && !path.empty()) {
            auto content = read_file(path);
            if (content) {
                table.content = std::move(*content);
            } else {
                notes.push_back(
                    fmt::format("milter_header_checks: cannot read {}: {}; its lines "
                                "are not checked",
                                spec, content.error().message));
            }
        } else if (!table.content) {
            notes.push_back(
                fmt::format("milter_header_checks: {} is not a regexp: or pcre: "
                            "table; its lines are not checked",
                            spec));
        }
        facts.header_checks_tables.push_back(std::move(table));
    }
    // For the external_only routes' pseudo-domains; only regexp:/pcre: tables are read (an
    // indexed one, hash: say, leaves the routes unchecked).
    for (const std::string& spec : split_postfix_list(facts.transport_maps)) {
        PostfixTable table{spec, inline_table_content(spec)};
        const std::string type = spec.substr(0, spec.find(':'));
        const std::string path =
            spec.find(':') == std::string::npos ? std::string() : spec.substr(spec.find(':') + 1);
        if (!table.content && (type == "pcre" || type == "regexp") && !path.empty()) {
            if (auto content = read_file(path)) table.content = std::move(*content);
        }
        facts.transport_tables.push_back(std::move(table));
    }
    return facts;
}

void report_postfix_wiring(const Config& config, const PostfixCheckOptions& options) {
    const auto print = [](const std::vector<WiringWarning>& warnings) {
        for (const WiringWarning& warning : warnings) {
            std::fprintf(stderr, "warning: %s\n", warning.message.c_str());
        }
    };
    print(check_routes_used(config));
    if (config.mta == Mta::sendmail) {
        // Postfix's main.cf and master.cf say nothing about a Sendmail in front.
        std::printf(
            "info: milter.mta = sendmail: Postfix wiring not checked (paas-milter "
            "sendmail-config prints what sendmail.mc and the mailertable need)\n");
        return;
    }

    std::string program = options.postconf;
    if (program.empty()) {
        if (::access(kDefaultPostconf, X_OK) != 0) {
            std::printf("info: postconf not found: Postfix wiring not checked\n");
            return;
        }
        program = kDefaultPostconf;
    }
    std::vector<std::string> notes;
    auto facts = gather_postfix_facts(program, options.config_directory, notes);
    if (!facts) {
        std::fprintf(stderr, "warning: %s: Postfix wiring not checked\n",
                     facts.error().to_string().c_str());
        return;
    }
    for (const std::string& note : notes) std::printf("info: %s\n", note.c_str());
    print(check_postfix_wiring(config, *facts));
}

}  // namespace paasmilter
