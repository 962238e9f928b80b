// Errors as values at module boundaries: a small std::expected stand-in (GCC 12 has no
// std::expected). An Error names where it happened (file:line) so operators can fix input.
#pragma once

#include <string>
#include <utility>
#include <variant>

namespace paasmilter {

// What a caller may need to decide on, beyond the text for humans.
enum class ErrorKind {
    other,
    // An HTTP request that certainly never reached the server (no connection slot, DNS,
    // connect, TLS handshake, no credentials): nothing can have been executed.
    request_not_sent,
    // An HTTP request that may have reached the server, without a complete answer (timeout,
    // reset): the server may have executed it.
    no_answer,
    // A message with more MIME parts than allowed: too expensive to convert.
    too_many_mime_parts,
    // A message larger than the service takes.
    too_large,
};

struct Error {
    std::string message;
    std::string file;  // empty when the error is not tied to a file
    int line = 0;      // 0 when unknown
    ErrorKind kind = ErrorKind::other;

    // "file:line: message", "file: message" or "message".
    std::string to_string() const {
        if (file.empty()) return message;
        if (line > 0) return file + ":" + std::to_string(line) + ": " + message;
        return file + ": " + message;
    }
};

inline Error make_error(std::string message, std::string file = {}, int line = 0) {
    return Error{std::move(message), std::move(file), line};
}

inline Error make_error(ErrorKind kind, std::string message) {
    return Error{std::move(message), {}, 0, kind};
}

template <class T>
class [[nodiscard]] Result {
  public:
    Result(T value) : v_(std::move(value)) {}
    Result(Error error) : v_(std::move(error)) {}

    bool ok() const { return v_.index() == 0; }
    explicit operator bool() const { return ok(); }

    T& value() & { return std::get<0>(v_); }
    const T& value() const& { return std::get<0>(v_); }
    T&& value() && { return std::get<0>(std::move(v_)); }
    T* operator->() { return &value(); }
    const T* operator->() const { return &value(); }
    T& operator*() & { return value(); }
    const T& operator*() const& { return value(); }

    const Error& error() const { return std::get<1>(v_); }

  private:
    std::variant<T, Error> v_;
};

template <>
class [[nodiscard]] Result<void> {
  public:
    Result() = default;
    Result(Error error) : error_(std::move(error)), ok_(false) {}

    bool ok() const { return ok_; }
    explicit operator bool() const { return ok_; }
    const Error& error() const { return error_; }

  private:
    Error error_;
    bool ok_ = true;
};

}  // namespace paasmilter
