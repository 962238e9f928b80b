// HTTPS client for the PaaS APIs: libcurl, connections reused across messages and threads,
// TLS verification always on, bounded concurrency.
#pragma once

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "paasmilter/result.hpp"

namespace paasmilter {

using HttpHeaders = std::vector<std::pair<std::string, std::string>>;

// A request body: its pieces' bytes, one after the other. Pieces are shared, never copied:
// a request, and every copy of it an attempt makes, points at the strings the body was
// rendered into, so a large body (an ACS request around a message's attachments) is in
// memory once, however many requests and retries send it.
class HttpBody {
  public:
    using Piece = std::shared_ptr<const std::string>;

    HttpBody() = default;
    // Implicit: most bodies are one string (a form, a small JSON document).
    HttpBody(std::string text) { append(std::move(text)); }
    HttpBody(const char* text) : HttpBody(std::string(text)) {}

    HttpBody& append(std::string text);
    HttpBody& append(const char* text) { return append(std::string(text)); }
    HttpBody& append(Piece piece);
    HttpBody& append(const HttpBody& more);

    size_t size() const { return size_; }
    bool empty() const { return size_ == 0; }
    const std::vector<Piece>& pieces() const { return pieces_; }
    // Copies up to `length` bytes from `offset` on into `out`; returns how many (0 at the end).
    size_t copy(size_t offset, char* out, size_t length) const;
    // The whole body in one string: a copy (for small bodies, logs and tests).
    std::string str() const;

  private:
    std::vector<Piece> pieces_;  // none empty
    size_t size_ = 0;
};

struct HttpRequest {
    std::string method = "POST";
    std::string url;
    HttpHeaders headers;
    HttpBody body;
};

struct HttpResponse {
    long status = 0;
    HttpHeaders headers;  // names as received
    std::string body;
    // First header of that name, case-insensitive.
    std::optional<std::string> header(std::string_view name) const;
};

struct HttpClientOptions {
    std::string ca_file;  // PEM bundle; empty: the system's default
    std::string proxy;    // "http://proxy:3128" (HTTPS is tunnelled with CONNECT); empty: none
    std::chrono::milliseconds connect_timeout{10'000};
    size_t max_concurrency = 8;           // requests in flight at once through this client
    size_t background_concurrency = 8;    // and background ones (the status poller's workers)
    size_t max_response_bytes = 1 << 20;  // a longer response body is an Error
    std::string user_agent = "paas-milter/0.1";
};

// Which budget of connection slots a request waits for.
enum class SlotPool {
    requests,    // the route's own requests: max_concurrency slots
    background,  // after-the-fact work (final-status polls): background_concurrency slots
                 // of their own, so that it never delays a message's requests
};

class HttpClient {
  public:
    explicit HttpClient(HttpClientOptions options);
    ~HttpClient();
    HttpClient(const HttpClient&) = delete;
    HttpClient& operator=(const HttpClient&) = delete;

    // Performs one request; `timeout` bounds the whole exchange. Any HTTP status is a
    // success here; an Error means no HTTP answer (DNS, connect, TLS, timeout, reset), and
    // its message says which. Its kind is request_not_sent when the request certainly never
    // reached the server, no_answer when it may have. Thread-safe.
    Result<HttpResponse> send(const HttpRequest& request, std::chrono::milliseconds timeout,
                              SlotPool pool = SlotPool::requests);

  private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

}  // namespace paasmilter
