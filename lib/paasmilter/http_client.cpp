#include "paasmilter/http_client.hpp"
#include "paasmilter/c_handle.hpp"
#include "paasmilter/text.hpp"

#include <curl/curl.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <mutex>

namespace paasmilter {
namespace {

using EasyPtr = std::unique_ptr<CURL, Deleter<curl_easy_cleanup>>;
using SlistPtr = std::unique_ptr<curl_slist, Deleter<curl_slist_free_all>>;
using SharePtr = std::unique_ptr<CURLSH, Deleter<curl_share_cleanup>>;

// libcurl's global state must be set up once, before any thread uses it.
CURLcode global_init() {
    static std::once_flag once;
    static CURLcode result = CURLE_OK;
    std::call_once(once, [] { result = curl_global_init(CURL_GLOBAL_DEFAULT); });
    return result;
}

std::string_view trim(std::string_view s) {
    while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
    while (!s.empty() &&
           (s.back() == ' ' || s.back() == '\t' || s.back() == '\r' || s.back() == '\n'))
        s.remove_suffix(1);
    return s;
}

// "host[:port]" of a URL for error messages: never user info, path or query.
std::string host_of(std::string_view url) {
    if (const size_t scheme = url.find("://"); scheme != std::string_view::npos)
        url.remove_prefix(scheme + 3);
    url = url.substr(0, std::min(url.find_first_of("/?#"), url.size()));
    if (const size_t at = url.rfind('@'); at != std::string_view::npos) url.remove_prefix(at + 1);
    return std::string(url);
}

// A counting semaphore with a deadline (std::counting_semaphore needs its maximum at compile
// time, and GCC 12's timed acquire is not dependable).
class Slots {
  public:
    explicit Slots(size_t count) : free_(count) {}
    bool acquire_until(std::chrono::steady_clock::time_point deadline) {
        std::unique_lock lock(mutex_);
        if (!available_.wait_until(lock, deadline, [&] { return free_ > 0; })) return false;
        --free_;
        return true;
    }
    void release() {
        {
            std::lock_guard lock(mutex_);
            ++free_;
        }
        available_.notify_one();
    }

  private:
    std::mutex mutex_;
    std::condition_variable available_;
    size_t free_;
};

// What the callbacks of one transfer write into.
struct Transfer {
    HttpResponse response;
    size_t max_body = 0;
    bool body_too_large = false;
};

size_t on_body(char* data, size_t size, size_t count, void* user) {
    auto* transfer = static_cast<Transfer*>(user);
    const size_t length = size * count;
    if (transfer->response.body.size() + length > transfer->max_body) {
        transfer->body_too_large = true;
        return 0;  // aborts the transfer with CURLE_WRITE_ERROR
    }
    transfer->response.body.append(data, length);
    return length;
}

// A body of several pieces, sent as libcurl asks for it (CURLOPT_READFUNCTION) instead of
// joined into one more copy first.
struct Upload {
    const HttpBody* body = nullptr;
    size_t offset = 0;
};

size_t on_upload(char* buffer, size_t size, size_t count, void* user) {
    auto* upload = static_cast<Upload*>(user);
    const size_t copied = upload->body->copy(upload->offset, buffer, size * count);
    upload->offset += copied;
    return copied;
}

// libcurl rewinds to send the body again (a reused connection found closed, a redirect).
int on_upload_seek(void* user, curl_off_t offset, int origin) {
    auto* upload = static_cast<Upload*>(user);
    if (origin != SEEK_SET || offset < 0 || static_cast<size_t>(offset) > upload->body->size())
        return CURL_SEEKFUNC_CANTSEEK;
    upload->offset = static_cast<size_t>(offset);
    return CURL_SEEKFUNC_OK;
}

size_t on_header(char* data, size_t size, size_t count, void* user) {
    auto* transfer = static_cast<Transfer*>(user);
    const size_t length = size * count;
    const std::string_view line(data, length);
    auto& headers = transfer->response.headers;
    if (line.rfind("HTTP/", 0) == 0) {
        headers.clear();  // a new response (after 100 Continue): keep only the final one
    } else if (!line.empty() && (line.front() == ' ' || line.front() == '\t')) {
        if (!headers.empty()) {  // obsolete line folding
            headers.back().second += ' ';
            headers.back().second += trim(line);
        }
    } else if (const size_t colon = line.find(':'); colon != std::string_view::npos) {
        headers.emplace_back(std::string(trim(line.substr(0, colon))),
                             std::string(trim(line.substr(colon + 1))));
    }
    return length;
}

}  // namespace

HttpBody& HttpBody::append(std::string text) {
    if (text.empty()) return *this;
    return append(std::make_shared<const std::string>(std::move(text)));
}

HttpBody& HttpBody::append(Piece piece) {
    if (!piece || piece->empty()) return *this;
    size_ += piece->size();
    pieces_.push_back(std::move(piece));
    return *this;
}

HttpBody& HttpBody::append(const HttpBody& more) {
    // A copy of the pointers first: `more` may be this body.
    const std::vector<Piece> pieces = more.pieces_;
    for (const Piece& piece : pieces) append(piece);
    return *this;
}

size_t HttpBody::copy(size_t offset, char* out, size_t length) const {
    size_t copied = 0;
    for (const Piece& piece : pieces_) {
        if (copied == length) break;
        if (offset >= piece->size()) {
            offset -= piece->size();
            continue;
        }
        const size_t n = std::min(piece->size() - offset, length - copied);
        std::memcpy(out + copied, piece->data() + offset, n);
        copied += n;
        offset = 0;
    }
    return copied;
}

std::string HttpBody::str() const {
    std::string out;
    out.reserve(size_);
    for (const Piece& piece : pieces_) out += *piece;
    return out;
}

std::optional<std::string> HttpResponse::header(std::string_view name) const {
    for (const auto& [key, value] : headers)
        if (iequals(key, name)) return value;
    return std::nullopt;
}

struct HttpClient::Impl {
    explicit Impl(HttpClientOptions o)
        : options(std::move(o)),
          slots(std::max<size_t>(1, options.max_concurrency)),
          background_slots(std::max<size_t>(1, options.background_concurrency)) {}

    HttpClientOptions options;
    CURLcode init_result = CURLE_OK;
    // Declared before `share`, `share` before `idle`: handles go first, then the share (which
    // refuses to go while handles use it), then its locks.
    std::array<std::mutex, CURL_LOCK_DATA_LAST> share_locks;
    SharePtr share;
    std::mutex pool_mutex;
    std::vector<EasyPtr> idle;  // LIFO: the most recently used handle has the warmest connection
    Slots slots;
    Slots background_slots;

    static void lock(CURL*, curl_lock_data data, curl_lock_access, void* user) {
        static_cast<Impl*>(user)->share_locks[static_cast<size_t>(data)].lock();
    }
    static void unlock(CURL*, curl_lock_data data, void* user) {
        static_cast<Impl*>(user)->share_locks[static_cast<size_t>(data)].unlock();
    }

    EasyPtr take_handle() {
        {
            std::lock_guard lock(pool_mutex);
            if (!idle.empty()) {
                EasyPtr handle = std::move(idle.back());
                idle.pop_back();
                return handle;
            }
        }
        return EasyPtr(curl_easy_init());
    }

    void give_back(EasyPtr handle) {
        // Drops every option (and so every pointer into the finished request) but keeps the
        // live connection, which is the point of pooling.
        curl_easy_reset(handle.get());
        std::lock_guard lock(pool_mutex);
        idle.push_back(std::move(handle));
    }
};

HttpClient::HttpClient(HttpClientOptions options)
    : impl_(std::make_unique<Impl>(std::move(options))) {
    impl_->init_result = global_init();
    if (impl_->init_result != CURLE_OK) return;
    // DNS and TLS sessions are shared by all handles. The connection cache is not: libcurl
    // does not support sharing it between concurrent threads (CURLSHOPT_SHARE(3)); each pooled
    // handle keeps its own connections instead.
    impl_->share.reset(curl_share_init());
    if (impl_->share) {
        CURLSH* share = impl_->share.get();
        curl_share_setopt(share, CURLSHOPT_LOCKFUNC, &Impl::lock);
        curl_share_setopt(share, CURLSHOPT_UNLOCKFUNC, &Impl::unlock);
        curl_share_setopt(share, CURLSHOPT_USERDATA, impl_.get());
        curl_share_setopt(share, CURLSHOPT_SHARE, CURL_LOCK_DATA_DNS);
        curl_share_setopt(share, CURLSHOPT_SHARE, CURL_LOCK_DATA_SSL_SESSION);
    }
}

HttpClient::~HttpClient() = default;

Result<HttpResponse> HttpClient::send(const HttpRequest& request, std::chrono::milliseconds timeout,
                                      SlotPool pool) {
    using std::chrono::milliseconds;
    const std::string host = host_of(request.url);
    const auto fail = [&](const std::string& why, ErrorKind kind = ErrorKind::request_not_sent) {
        return make_error(kind, "HTTPS request to " + host + " failed: " + why);
    };
    if (impl_->init_result != CURLE_OK)
        return fail(std::string("libcurl initialisation: ") +
                    curl_easy_strerror(impl_->init_result));

    // Waiting for a slot is part of the request's time budget.
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    Slots& slots = pool == SlotPool::background ? impl_->background_slots : impl_->slots;
    if (timeout.count() <= 0 || !slots.acquire_until(deadline)) {
        return fail("no free connection slot within " + std::to_string(timeout.count()) +
                    " ms (max_concurrency " + std::to_string(impl_->options.max_concurrency) +
                    (pool == SlotPool::background ? ", background" : "") + ")");
    }
    struct SlotGuard {
        Slots& slots;
        ~SlotGuard() { slots.release(); }
    } slot_guard{slots};
    const auto remaining =
        std::chrono::duration_cast<milliseconds>(deadline - std::chrono::steady_clock::now());
    if (remaining.count() <= 0) return fail("timed out waiting for a connection slot");

    SlistPtr header_list;
    bool have_expect = false;
    for (const auto& [name, value] : request.headers) {
        // A line break would smuggle another header in; name the header, not its value.
        if (name.find_first_of("\r\n:") != std::string::npos ||
            value.find_first_of("\r\n") != std::string::npos)
            return fail("header '" + name + "' has a line break or a bad name");
        if (iequals(name, "Expect")) have_expect = true;
        // "Name;" is libcurl's way to send a header with an empty value.
        const std::string line = value.empty() ? name + ";" : name + ": " + value;
        curl_slist* appended = curl_slist_append(header_list.get(), line.c_str());
        if (!appended) return fail("out of memory");
        header_list.release();
        header_list.reset(appended);
    }
    if (!have_expect) {
        // No "Expect: 100-continue" round trip before large bodies.
        curl_slist* appended = curl_slist_append(header_list.get(), "Expect:");
        if (!appended) return fail("out of memory");
        header_list.release();
        header_list.reset(appended);
    }

    EasyPtr handle = impl_->take_handle();
    if (!handle) return fail("curl_easy_init failed");
    CURL* curl = handle.get();
    Transfer transfer;
    transfer.max_body = impl_->options.max_response_bytes;
    Upload upload{&request.body, 0};
    char error_buffer[CURL_ERROR_SIZE] = {};
    const auto& options = impl_->options;

    curl_easy_setopt(curl, CURLOPT_ERRORBUFFER, error_buffer);
    curl_easy_setopt(curl, CURLOPT_URL, request.url.c_str());
    curl_easy_setopt(curl, CURLOPT_PROTOCOLS_STR, "https");
    curl_easy_setopt(curl, CURLOPT_REDIR_PROTOCOLS_STR, "https");
    curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);  // signals and threads do not mix
    curl_easy_setopt(curl, CURLOPT_SSL_VERIFYPEER, 1L);
    curl_easy_setopt(curl, CURLOPT_SSL_VERIFYHOST, 2L);
    if (!options.ca_file.empty()) curl_easy_setopt(curl, CURLOPT_CAINFO, options.ca_file.c_str());
    // An empty string also keeps libcurl from taking a proxy from the environment.
    curl_easy_setopt(curl, CURLOPT_PROXY, options.proxy.c_str());
    curl_easy_setopt(curl, CURLOPT_SUPPRESS_CONNECT_HEADERS, 1L);
    curl_easy_setopt(curl, CURLOPT_HTTP_VERSION, static_cast<long>(CURL_HTTP_VERSION_2TLS));
    curl_easy_setopt(curl, CURLOPT_TIMEOUT_MS, static_cast<long>(remaining.count()));
    curl_easy_setopt(curl, CURLOPT_CONNECTTIMEOUT_MS,
                     static_cast<long>(std::min(remaining, options.connect_timeout).count()));
    curl_easy_setopt(curl, CURLOPT_TCP_KEEPALIVE, 1L);
    curl_easy_setopt(curl, CURLOPT_USERAGENT, options.user_agent.c_str());
    if (impl_->share) curl_easy_setopt(curl, CURLOPT_SHARE, impl_->share.get());
    curl_easy_setopt(curl, CURLOPT_HTTPHEADER, header_list.get());
    curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, &on_body);
    curl_easy_setopt(curl, CURLOPT_WRITEDATA, &transfer);
    curl_easy_setopt(curl, CURLOPT_HEADERFUNCTION, &on_header);
    curl_easy_setopt(curl, CURLOPT_HEADERDATA, &transfer);

    if (request.method == "GET") {
        curl_easy_setopt(curl, CURLOPT_HTTPGET, 1L);
    } else if (request.method == "HEAD") {
        curl_easy_setopt(curl, CURLOPT_NOBODY, 1L);
    } else {
        const auto& pieces = request.body.pieces();
        if (pieces.size() > 1) {
            curl_easy_setopt(curl, CURLOPT_POST, 1L);
            curl_easy_setopt(curl, CURLOPT_READFUNCTION, &on_upload);
            curl_easy_setopt(curl, CURLOPT_READDATA, &upload);
            curl_easy_setopt(curl, CURLOPT_SEEKFUNCTION, &on_upload_seek);
            curl_easy_setopt(curl, CURLOPT_SEEKDATA, &upload);
            curl_easy_setopt(curl, CURLOPT_POSTFIELDSIZE_LARGE,
                             static_cast<curl_off_t>(request.body.size()));
        } else if (request.method == "POST" || !pieces.empty()) {
            // One piece (or none) is sent from where it is: libcurl does not copy it.
            curl_easy_setopt(curl, CURLOPT_POSTFIELDS, pieces.empty() ? "" : pieces[0]->data());
            curl_easy_setopt(curl, CURLOPT_POSTFIELDSIZE_LARGE,
                             static_cast<curl_off_t>(request.body.size()));
        }
        if (request.method != "POST")
            curl_easy_setopt(curl, CURLOPT_CUSTOMREQUEST, request.method.c_str());
    }

    const CURLcode code = curl_easy_perform(curl);
    long status = 0;
    curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &status);
    // Zero until the transfer is about to send the request: a failure before that point
    // (DNS, connect, proxy, TLS handshake) left nothing at the server.
    curl_off_t pretransfer = 0;
    curl_easy_getinfo(curl, CURLINFO_PRETRANSFER_TIME_T, &pretransfer);
    impl_->give_back(std::move(handle));

    if (transfer.body_too_large) {
        return fail(
            "response body larger than " + std::to_string(options.max_response_bytes) + " bytes",
            ErrorKind::no_answer);
    }
    if (code != CURLE_OK) {
        const ErrorKind kind =
            pretransfer == 0 ? ErrorKind::request_not_sent : ErrorKind::no_answer;
        // The error buffer says more ("SSL certificate problem: ..."); it often already ends
        // with the generic text.
        const std::string generic = curl_easy_strerror(code);
        const std::string detail(trim(error_buffer));
        if (detail.empty()) return fail(generic, kind);
        if (detail.find(generic) != std::string::npos) return fail(detail, kind);
        return fail(generic + ": " + detail, kind);
    }
    transfer.response.status = status;
    return std::move(transfer.response);
}

}  // namespace paasmilter
