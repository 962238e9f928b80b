#include "health.hpp"

#include <arpa/inet.h>
#include <libmilter/mfdef.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include <fmt/format.h>
#include <toml++/toml.h>

#include "paasmilter/unique_fd.hpp"

namespace paasmilter {
namespace {

using Clock = std::chrono::steady_clock;

constexpr const char* kHealthUsage =
    "usage: paas-milter health [-c FILE] [--socket SPEC] [--timeout SECONDS]\n";
constexpr double kDefaultTimeoutSeconds = 5;

// What Postfix offers with milter_protocol = 6: protocol version 6, every action and every
// protocol step of that version. The milter answers with the subset it wants.
constexpr uint32_t kProtocolVersion = SMFI_PROT_VERSION;
constexpr uint32_t kOfferedActions = SMFI_CURR_ACTS;
constexpr uint32_t kOfferedSteps = SMFI_CURR_PROT;
// libmilter may add these to its answer (smfi_setmaxdatasize).
constexpr uint32_t kDataSizeSteps = SMFIP_MDS_256K | SMFIP_MDS_1M;
// An option negotiation reply is 13 bytes, plus the macro lists a milter may ask for.
constexpr uint32_t kMaxReplyLength = 64 * 1024;

struct HealthError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

struct UsageError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

struct Endpoint {
    std::string spec;  // as configured, for messages
    int family = AF_UNSPEC;
    std::string path;  // AF_UNIX
    std::string host;  // AF_INET, AF_INET6
    std::string port;
};

// libmilter's socket syntax: "unix:/path" (or "local:/path", or a bare path),
// "inet:PORT@HOST", "inet6:PORT@HOST". Without a host libmilter listens on every address;
// we ask the loopback address then.
Endpoint parse_endpoint(const std::string& spec) {
    Endpoint endpoint;
    endpoint.spec = spec;
    const size_t colon = spec.find(':');
    const std::string_view kind =
        colon == std::string::npos ? std::string_view() : std::string_view(spec).substr(0, colon);
    const std::string rest = colon == std::string::npos ? spec : spec.substr(colon + 1);
    if (kind.empty() || kind == "unix" || kind == "local") {
        if (rest.empty()) throw HealthError(fmt::format("socket \"{}\" names no path", spec));
        endpoint.family = AF_UNIX;
        endpoint.path = rest;
        return endpoint;
    }
    if (kind != "inet" && kind != "inet6") {
        throw HealthError(fmt::format(
            "socket \"{}\" is not \"inet:PORT@HOST\", \"inet6:PORT@HOST\" or \"unix:/path\"",
            spec));
    }
    endpoint.family = kind == "inet" ? AF_INET : AF_INET6;
    const size_t at = rest.find('@');
    endpoint.port = rest.substr(0, at);
    endpoint.host = at == std::string::npos ? std::string() : rest.substr(at + 1);
    if (endpoint.port.empty()) {
        throw HealthError(
            fmt::format("socket \"{}\" names no port (\"{}:PORT@HOST\")", spec, kind));
    }
    if (endpoint.host.size() >= 2 && endpoint.host.front() == '[' && endpoint.host.back() == ']') {
        endpoint.host = endpoint.host.substr(1, endpoint.host.size() - 2);
    }
    if (endpoint.host.empty()) endpoint.host = endpoint.family == AF_INET ? "127.0.0.1" : "::1";
    return endpoint;
}

int remaining_ms(Clock::time_point deadline) {
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
    return left <= 0 ? 0 : static_cast<int>(left);
}

// Waits for EVENTS on FD until DEADLINE; false on timeout.
bool wait_for(int fd, short events, Clock::time_point deadline) {
    for (;;) {
        pollfd p{fd, events, 0};
        const int n = ::poll(&p, 1, remaining_ms(deadline));
        if (n > 0) return true;
        if (n == 0) return false;
        if (errno != EINTR) throw HealthError(fmt::format("poll: {}", std::strerror(errno)));
    }
}

std::string describe_address(const sockaddr* address) {
    char host[INET6_ADDRSTRLEN] = "?";
    unsigned port = 0;
    if (address->sa_family == AF_INET) {
        const auto* in = reinterpret_cast<const sockaddr_in*>(address);
        ::inet_ntop(AF_INET, &in->sin_addr, host, sizeof host);
        port = ntohs(in->sin_port);
        return fmt::format("{} port {}", host, port);
    }
    const auto* in6 = reinterpret_cast<const sockaddr_in6*>(address);
    ::inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof host);
    port = ntohs(in6->sin6_port);
    return fmt::format("[{}] port {}", host, port);
}

// Connects a non-blocking socket to ADDRESS; on failure returns an empty UniqueFd and sets
// ERROR.
UniqueFd connect_once(const sockaddr* address, socklen_t length, Clock::time_point deadline,
                      std::string& error) {
    UniqueFd fd(::socket(address->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
    if (!fd) {
        error = fmt::format("socket: {}", std::strerror(errno));
        return UniqueFd();
    }
    if (::connect(fd.get(), address, length) == 0) return fd;
    if (errno != EINPROGRESS && errno != EINTR) {
        error = std::strerror(errno);
        return UniqueFd();
    }
    if (!wait_for(fd.get(), POLLOUT, deadline)) {
        error = "timed out connecting";
        return UniqueFd();
    }
    int so_error = 0;
    socklen_t so_length = sizeof so_error;
    if (::getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &so_error, &so_length) != 0) {
        so_error = errno;
    }
    if (so_error != 0) {
        error = std::strerror(so_error);
        return UniqueFd();
    }
    return fd;
}

UniqueFd connect_to(const Endpoint& endpoint, Clock::time_point deadline) {
    std::string error;
    if (endpoint.family == AF_UNIX) {
        sockaddr_un address{};
        address.sun_family = AF_UNIX;
        if (endpoint.path.size() >= sizeof address.sun_path) {
            throw HealthError(fmt::format("socket path {} is too long", endpoint.path));
        }
        std::memcpy(address.sun_path, endpoint.path.data(), endpoint.path.size());
        UniqueFd fd = connect_once(reinterpret_cast<const sockaddr*>(&address), sizeof address,
                                   deadline, error);
        if (!fd) {
            throw HealthError(fmt::format("cannot connect to {}: {}", endpoint.spec, error));
        }
        return fd;
    }

    addrinfo hints{};
    hints.ai_family = endpoint.family;
    hints.ai_socktype = SOCK_STREAM;
    addrinfo* found = nullptr;
    if (int rc = ::getaddrinfo(endpoint.host.c_str(), endpoint.port.c_str(), &hints, &found);
        rc != 0) {
        throw HealthError(fmt::format("cannot connect to {}: cannot resolve {} port {}: {}",
                                      endpoint.spec, endpoint.host, endpoint.port,
                                      rc == EAI_SYSTEM ? std::strerror(errno) : gai_strerror(rc)));
    }
    std::string errors;
    UniqueFd fd;
    for (const addrinfo* a = found; a && !fd; a = a->ai_next) {
        fd = connect_once(a->ai_addr, a->ai_addrlen, deadline, error);
        if (!fd) {
            errors += fmt::format("{}{}: {}", errors.empty() ? "" : "; ",
                                  describe_address(a->ai_addr), error);
        }
    }
    ::freeaddrinfo(found);
    if (!fd) throw HealthError(fmt::format("cannot connect to {}: {}", endpoint.spec, errors));
    return fd;
}

void send_all(int fd, std::string_view data, Clock::time_point deadline, const char* what) {
    while (!data.empty()) {
        const ssize_t n = ::send(fd, data.data(), data.size(), MSG_NOSIGNAL);
        if (n > 0) {
            data.remove_prefix(static_cast<size_t>(n));
            continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            if (!wait_for(fd, POLLOUT, deadline)) {
                throw HealthError(fmt::format("timed out sending {}", what));
            }
            continue;
        }
        throw HealthError(fmt::format("cannot send {}: {}", what, std::strerror(errno)));
    }
}

// Reads up to SIZE bytes into OUT until DEADLINE; fewer at end of file or (with
// TIMED_OUT set) when the deadline passed.
size_t receive(int fd, char* out, size_t size, Clock::time_point deadline, bool& timed_out) {
    size_t got = 0;
    timed_out = false;
    while (got < size) {
        if (!wait_for(fd, POLLIN, deadline)) {
            timed_out = true;
            break;
        }
        const ssize_t n = ::recv(fd, out + got, size - got, 0);
        if (n > 0) {
            got += static_cast<size_t>(n);
        } else if (n == 0 || errno == ECONNRESET) {
            // A reset (a server that closed with our request unread) ends it like a close.
            break;
        } else if (errno != EINTR && errno != EAGAIN && errno != EWOULDBLOCK) {
            throw HealthError(fmt::format("cannot read the answer: {}", std::strerror(errno)));
        }
    }
    return got;
}

// As receive(), but a timeout is an error.
size_t receive_reply(int fd, char* out, size_t size, Clock::time_point deadline, double timeout) {
    bool timed_out = false;
    const size_t got = receive(fd, out, size, deadline, timed_out);
    if (timed_out) {
        throw HealthError(fmt::format("no answer to the option negotiation within {:g} s{}",
                                      timeout, got ? " (only part of one)" : ""));
    }
    return got;
}

std::string packet(char command, std::string_view data = {}) {
    const uint32_t length = htonl(static_cast<uint32_t>(data.size() + 1));
    std::string out(reinterpret_cast<const char*>(&length), sizeof length);
    out += command;
    out += data;
    return out;
}

void append_u32(std::string& out, uint32_t value) {
    const uint32_t net = htonl(value);
    out.append(reinterpret_cast<const char*>(&net), sizeof net);
}

uint32_t read_u32(const char* in) {
    uint32_t net;
    std::memcpy(&net, in, sizeof net);
    return ntohl(net);
}

// The bytes as C-like text, for "this is not a milter" messages.
std::string printable(std::string_view bytes) {
    std::string out;
    for (unsigned char c : bytes) {
        if (c == '\\' || c == '"') {
            out += '\\';
            out += static_cast<char>(c);
        } else if (c >= 0x20 && c < 0x7f) {
            out += static_cast<char>(c);
        } else if (c == '\r') {
            out += "\\r";
        } else if (c == '\n') {
            out += "\\n";
        } else {
            out += fmt::format("\\x{:02x}", c);
        }
    }
    return out;
}

const char* reply_name(char command) {
    switch (command) {
        case SMFIR_ACCEPT:
            return "accept";
        case SMFIR_CONTINUE:
            return "continue";
        case SMFIR_DISCARD:
            return "discard";
        case SMFIR_REJECT:
            return "reject";
        case SMFIR_TEMPFAIL:
            return "tempfail";
        case SMFIR_REPLYCODE:
            return "reply code";
        case SMFIR_SHUTDOWN:
            return "shutdown";
        case SMFIR_CONN_FAIL:
            return "connection failure";
        default:
            return nullptr;
    }
}

struct Negotiated {
    uint32_t version = 0;
    uint32_t actions = 0;
    uint32_t steps = 0;
};

Negotiated negotiate(int fd, Clock::time_point deadline, double timeout) {
    std::string offer;
    append_u32(offer, kProtocolVersion);
    append_u32(offer, kOfferedActions);
    append_u32(offer, kOfferedSteps);
    send_all(fd, packet(SMFIC_OPTNEG, offer), deadline, "the option negotiation");

    char head[4];
    const size_t got = receive_reply(fd, head, sizeof head, deadline, timeout);
    if (got == 0) {
        throw HealthError("the connection was closed without an answer to the option negotiation");
    }
    if (got < sizeof head) {
        throw HealthError(fmt::format("not a milter: answered \"{}\" and closed the connection",
                                      printable(std::string_view(head, got))));
    }
    const uint32_t length = read_u32(head);
    if (length == 0 || length > kMaxReplyLength) {
        // Not a milter packet; show what came instead (a banner, a TLS alert, ...).
        std::string first(head, sizeof head);
        char more[60];
        bool timed_out = false;
        first.append(
            more,
            receive(fd, more, sizeof more,
                    std::min(deadline, Clock::now() + std::chrono::milliseconds(200)), timed_out));
        throw HealthError(fmt::format("not a milter: answered \"{}\"", printable(first)));
    }
    std::string reply(length, '\0');
    if (receive_reply(fd, reply.data(), length, deadline, timeout) < length) {
        throw HealthError("the connection was closed in the middle of the answer");
    }
    const char command = reply[0];
    if (command != SMFIC_OPTNEG) {
        const char* name = reply_name(command);
        if (name) {
            throw HealthError(
                fmt::format("answered '{}' ({}) instead of the option negotiation", command, name));
        }
        throw HealthError(fmt::format("not a milter: answered \"{}\"",
                                      printable(std::string(head, sizeof head) + reply)));
    }
    if (reply.size() < 13) {
        throw HealthError(
            fmt::format("the option negotiation answer is too short ({} bytes)", reply.size() - 1));
    }
    Negotiated result{read_u32(&reply[1]), read_u32(&reply[5]), read_u32(&reply[9])};
    if (result.version < 2 || result.version > kProtocolVersion) {
        throw HealthError(fmt::format("answered protocol version {}; offered were 2 to {}",
                                      result.version, kProtocolVersion));
    }
    if ((result.actions & ~kOfferedActions) != 0 ||
        (result.steps & ~(kOfferedSteps | kDataSizeSteps)) != 0) {
        throw HealthError(fmt::format(
            "asked for actions {:#x} and protocol steps {:#x}, more than offered ({:#x}, {:#x})",
            result.actions, result.steps, kOfferedActions, kOfferedSteps));
    }
    return result;
}

std::string socket_from_config(const std::string& path) {
    if (::access(path.c_str(), R_OK) != 0) {
        throw HealthError(fmt::format("cannot read {}: {}", path, std::strerror(errno)));
    }
    toml::table root;
    try {
        root = toml::parse_file(path);
    } catch (const toml::parse_error& e) {
        throw HealthError(fmt::format("{}:{}: {}", path, e.source().begin.line, e.description()));
    }
    const std::optional<std::string> socket = root["milter"]["socket"].value<std::string>();
    if (!socket || socket->empty()) {
        throw HealthError(fmt::format("{}: no milter.socket", path));
    }
    return *socket;
}

}  // namespace

int command_health(int argc, char** argv, const char* default_config) {
    std::string config = default_config;
    std::string socket;
    double timeout = kDefaultTimeoutSeconds;
    try {
        for (int i = 0; i < argc; ++i) {
            const std::string_view arg = argv[i];
            if (arg == "-h" || arg == "--help") {
                std::fputs(kHealthUsage, stdout);
                return 0;
            }
            if (arg != "-c" && arg != "--config" && arg != "--socket" && arg != "--timeout") {
                throw UsageError(fmt::format("unknown option '{}'", arg));
            }
            if (i + 1 >= argc) {
                throw UsageError(fmt::format("option '{}' needs a value", arg));
            }
            const char* value = argv[++i];
            if (arg == "--socket") {
                socket = value;
            } else if (arg == "--timeout") {
                char* end = nullptr;
                timeout = std::strtod(value, &end);
                if (end == value || *end != '\0' || !std::isfinite(timeout) || timeout <= 0 ||
                    timeout > 3600) {
                    throw UsageError(fmt::format(
                        "--timeout wants seconds (0 < SECONDS <= 3600), got '{}'", value));
                }
            } else {
                config = value;
            }
        }

        if (socket.empty()) socket = socket_from_config(config);
        const Endpoint endpoint = parse_endpoint(socket);
        const Clock::time_point start = Clock::now();
        const Clock::time_point deadline = start + std::chrono::duration_cast<Clock::duration>(
                                                       std::chrono::duration<double>(timeout));
        UniqueFd fd = connect_to(endpoint, deadline);
        Negotiated negotiated;
        try {
            negotiated = negotiate(fd.get(), deadline, timeout);
        } catch (const HealthError& e) {
            throw HealthError(fmt::format("{}: {}", endpoint.spec, e.what()));
        }
        const double elapsed_ms =
            std::chrono::duration<double, std::milli>(Clock::now() - start).count();
        // Say goodbye as an MTA does; the milter closes its end. Nothing to wait for.
        try {
            send_all(fd.get(), packet(SMFIC_QUIT), deadline, "QUIT");
        } catch (const HealthError&) {
        }
        std::printf(
            "paas-milter: OK: milter on %s answered option negotiation (version %u) in %.1f ms\n",
            endpoint.spec.c_str(), negotiated.version, elapsed_ms);
        return 0;
    } catch (const UsageError& e) {
        std::fprintf(stderr, "paas-milter: health: %s\n%s", e.what(), kHealthUsage);
        return 1;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "paas-milter: health: %s\n", e.what());
        return 1;
    }
}

}  // namespace paasmilter
