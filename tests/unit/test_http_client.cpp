#include <doctest/doctest.h>

#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "paasmilter/http_client.hpp"
#include "temp_dir.hpp"
#include "test_support.hpp"

extern char** environ;

using namespace paasmilter;
using namespace std::chrono_literals;
using namespace paasmilter::testing;

namespace {

// Test endpoints: /echo (request as JSON, with the client's port), /sleep?ms=N[&track=1] (with
// track: counted in flight), /peak[?reset=1] (most tracked at once), /big?n=N, /status?code=N,
// /hangup-next (the next request on the connection gets no answer: the connection closes).
constexpr const char* kServerScript = R"PY(
import http.server, json, ssl, sys, threading, time, urllib.parse
lock = threading.Lock()
state = {"inflight": 0, "peak": 0}

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args): pass
    def reply(self, status, body):
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Mock", "yes")
        self.end_headers()
        self.wfile.write(data)
    def handle_any(self):
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if getattr(self, "hangup", False):
            self.close_connection = True
            return
        if url.path == "/echo":
            self.reply(200, json.dumps({"method": self.command, "path": self.path,
                "body": body.decode(), "port": self.client_address[1],
                "headers": {k.lower(): v for k, v in self.headers.items()}}))
        elif url.path == "/sleep":
            track = "track" in query
            with lock:
                state["inflight"] += track
                state["peak"] = max(state["peak"], state["inflight"])
            time.sleep(int(query.get("ms", "0")) / 1000)
            with lock:
                state["inflight"] -= track
            self.reply(200, "slept")
        elif url.path == "/peak":
            with lock:
                peak = state["peak"]
                if "reset" in query: state["peak"] = 0
            self.reply(200, str(peak))
        elif url.path == "/big":
            self.reply(200, "x" * int(query["n"]))
        elif url.path == "/status":
            self.reply(int(query["code"]), "{}")
        elif url.path == "/hangup-next":
            # the next request on this connection is read, then the connection is closed
            # without an answer
            self.reply(200, "{}")
            self.hangup = True
        else:
            self.reply(404, "{}")
    do_GET = do_POST = do_PUT = do_DELETE = handle_any

server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
server.daemon_threads = True
server.handle_error = lambda *args: None
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(sys.argv[1], sys.argv[2])
server.socket = context.wrap_socket(server.socket, server_side=True)
print(server.server_address[1], flush=True)
server.serve_forever()
)PY";

// One server for the whole file: starting python and making a certificate takes a while.
MockHttpsServer& server() {
    static MockHttpsServer instance(kServerScript);
    return instance;
}

HttpClientOptions trusting(size_t max_concurrency = 8) {
    HttpClientOptions options;
    options.ca_file = server().ca_file();
    options.max_concurrency = max_concurrency;
    return options;
}

HttpRequest get(const std::string& path) {
    HttpRequest request;
    request.method = "GET";
    request.url = server().url(path);
    return request;
}

nlohmann::json echo(HttpClient& client, HttpRequest request) {
    auto response = client.send(request, 5s);
    REQUIRE_MESSAGE(response.ok(), response.error().message);
    REQUIRE(response->status == 200);
    return nlohmann::json::parse(response->body);
}

}  // namespace

TEST_CASE("HttpClient: GET and POST, request and response headers") {
    HttpClient client(trusting());

    auto response = client.send(get("/echo?x=1"), 5s);
    REQUIRE_MESSAGE(response.ok(), response.error().message);
    CHECK(response->status == 200);
    CHECK(response->header("x-mock") == "yes");
    CHECK(response->header("CONTENT-TYPE") == "application/json");
    CHECK_FALSE(response->header("x-missing").has_value());
    auto json = nlohmann::json::parse(response->body);
    CHECK(json["method"] == "GET");
    CHECK(json["path"] == "/echo?x=1");
    // The Host header the ACS signature covers: port included when not 443.
    CHECK(json["headers"]["host"] == "127.0.0.1:" + std::to_string(server().port()));

    HttpRequest post;
    post.url = server().url("/echo");
    post.headers = {{"Content-Type", "application/json"}, {"X-Custom", "v1"}, {"X-Empty", ""}};
    post.body = std::string(3000, 'b');  // above curl's Expect: 100-continue threshold of old
    json = echo(client, post);
    CHECK(json["method"] == "POST");
    CHECK(json["body"] == post.body.str());
    CHECK(json["headers"]["x-custom"] == "v1");
    CHECK(json["headers"]["x-empty"] == "");
    CHECK_FALSE(json["headers"].contains("expect"));

    HttpRequest put = post;
    put.method = "PUT";
    put.body = "put-body";
    json = echo(client, put);
    CHECK(json["method"] == "PUT");
    CHECK(json["body"] == "put-body");

    HttpRequest status = get("/status?code=429");
    response = client.send(status, 5s);
    REQUIRE(response.ok());  // any HTTP status is an answer
    CHECK(response->status == 429);
}

TEST_CASE("HttpBody: pieces shared, read at any offset, joined") {
    HttpBody body = std::string("{\"a\":\"");
    auto shared = std::make_shared<const std::string>("0123456789");
    body.append(shared).append(std::string()).append("\"}");
    CHECK(body.pieces().size() == 3);  // the empty one is not a piece
    CHECK(body.size() == 18);
    CHECK(body.str() == "{\"a\":\"0123456789\"}");
    CHECK(body.pieces()[1] == shared);  // not copied

    char out[32] = {};
    CHECK(body.copy(0, out, 4) == 4);
    CHECK(std::string(out, 4) == "{\"a\"");
    CHECK(body.copy(5, out, 10) == 10);  // across the first two pieces
    CHECK(std::string(out, 10) == "\"012345678");
    CHECK(body.copy(14, out, sizeof out) == 4);  // the rest, across the last two
    CHECK(std::string(out, 4) == "89\"}");
    CHECK(body.copy(18, out, sizeof out) == 0);
    CHECK(body.copy(100, out, sizeof out) == 0);

    HttpBody twice = body;
    twice.append(twice);
    CHECK(twice.str() == body.str() + body.str());
    CHECK(twice.pieces()[4] == shared);
    CHECK(HttpBody().empty());
    CHECK(HttpBody("").pieces().empty());
}

TEST_CASE("HttpClient: a body in pieces goes as one, with its length, also when resent") {
    HttpClient client(trusting());
    // A body of several pieces is read by libcurl as it sends; one of 512 KiB among them.
    HttpRequest post;
    post.url = server().url("/echo");
    post.headers = {{"Content-Type", "application/json"}};
    post.body = std::string("start-");
    post.body.append(std::make_shared<const std::string>(512 * 1024, 'x')).append("-end");
    REQUIRE(post.body.pieces().size() == 3);
    auto json = echo(client, post);
    CHECK(json["method"] == "POST");
    CHECK(json["headers"]["content-length"] == std::to_string(post.body.size()));
    CHECK(json["body"] == post.body.str());
    CHECK_FALSE(json["headers"].contains("expect"));
    CHECK_FALSE(json["headers"].contains("transfer-encoding"));

    HttpRequest put = post;
    put.method = "PUT";
    json = echo(client, put);
    CHECK(json["method"] == "PUT");
    CHECK(json["body"] == post.body.str());

    // The connection it reuses closes without an answer once the body is sent: libcurl
    // sends it again on a new connection, from the start of the body (CURLOPT_SEEKFUNCTION).
    REQUIRE(client.send(get("/hangup-next"), 5s).ok());
    json = echo(client, post);
    CHECK(json["body"] == post.body.str());
}

TEST_CASE("HttpClient: connections are reused across requests and threads") {
    HttpClient client(trusting());
    const int first = echo(client, get("/echo"))["port"];
    const int second = echo(client, get("/echo"))["port"];
    CHECK(first == second);
    int from_thread = 0;
    std::thread([&] { from_thread = echo(client, get("/echo"))["port"]; }).join();
    CHECK(from_thread == first);
}

TEST_CASE("HttpClient: TLS verification fails without the CA file, succeeds with it") {
    HttpClient untrusting{HttpClientOptions{}};
    auto response = untrusting.send(get("/echo"), 5s);
    REQUIRE_FALSE(response.ok());
    const std::string& message = response.error().message;
    CHECK(message.find("127.0.0.1:" + std::to_string(server().port())) != std::string::npos);
    CHECK(message.find("certificate") != std::string::npos);

    HttpClient trusted(trusting());
    CHECK(trusted.send(get("/echo"), 5s).ok());
}

TEST_CASE("HttpClient: the timeout bounds the whole exchange") {
    HttpClient client(trusting());
    const auto start = std::chrono::steady_clock::now();
    auto response = client.send(get("/sleep?ms=3000"), 300ms);
    const auto elapsed = std::chrono::steady_clock::now() - start;
    REQUIRE_FALSE(response.ok());
    CHECK(response.error().message.find("Timeout") != std::string::npos);
    CHECK(elapsed < 2s);
    // The handle that timed out is usable again.
    CHECK(client.send(get("/echo"), 5s).ok());
}

TEST_CASE("HttpClient: a failure says whether the request can have reached the server") {
    HttpClient client(trusting());
    HttpRequest post = get("/sleep?ms=3000");
    post.method = "POST";
    post.body = "{}";
    // Sent, then no answer in time: the server may have acted on it.
    auto timed_out = client.send(post, 300ms);
    REQUIRE_FALSE(timed_out.ok());
    CHECK(timed_out.error().kind == ErrorKind::no_answer);
    // Nothing listens on port 1, and an untrusted certificate stops the handshake: never sent.
    post.url = "https://127.0.0.1:1/echo";
    auto refused = client.send(post, 2s);
    REQUIRE_FALSE(refused.ok());
    CHECK(refused.error().kind == ErrorKind::request_not_sent);
    HttpClient untrusting{HttpClientOptions{}};
    auto untrusted = untrusting.send(get("/echo"), 5s);
    REQUIRE_FALSE(untrusted.ok());
    CHECK(untrusted.error().kind == ErrorKind::request_not_sent);
}

TEST_CASE("HttpClient: max_concurrency caps requests in flight; waiting counts as time") {
    REQUIRE(HttpClient(trusting()).send(get("/peak?reset=1"), 5s).ok());
    HttpClient client(trusting(2));
    std::atomic<int> succeeded{0};
    std::vector<std::thread> threads;
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < 6; ++i) {
        threads.emplace_back([&] {
            if (auto r = client.send(get("/sleep?ms=250&track=1"), 5s); r.ok() && r->status == 200)
                ++succeeded;
        });
    }
    for (auto& thread : threads) thread.join();
    CHECK(succeeded == 6);
    CHECK(std::chrono::steady_clock::now() - start >= 700ms);  // three waves of two
    auto peak = client.send(get("/peak?reset=1"), 5s);
    REQUIRE(peak.ok());
    CHECK(peak->body == "2");

    HttpClient single(trusting(1));
    std::thread busy([&] { CHECK(single.send(get("/sleep?ms=1000"), 5s).ok()); });
    std::this_thread::sleep_for(150ms);
    const auto waited_from = std::chrono::steady_clock::now();
    auto starved = single.send(get("/echo"), 200ms);
    CHECK(std::chrono::steady_clock::now() - waited_from < 700ms);
    busy.join();
    REQUIRE_FALSE(starved.ok());
    CHECK(starved.error().message.find("slot") != std::string::npos);
    CHECK(starved.error().kind == ErrorKind::request_not_sent);
}

TEST_CASE("HttpClient: background requests have slots of their own") {
    auto options = trusting(2);
    options.background_concurrency = 1;
    HttpClient client(options);
    // Both request slots busy: a background request still goes at once...
    std::vector<std::thread> busy;
    for (int i = 0; i < 2; ++i) {
        busy.emplace_back([&] { CHECK(client.send(get("/sleep?ms=1000"), 5s).ok()); });
    }
    std::this_thread::sleep_for(150ms);
    auto polled = client.send(get("/echo"), 300ms, SlotPool::background);
    CHECK(polled.ok());
    // ...and a request, which must wait for its own slots, does not.
    auto starved = client.send(get("/echo"), 200ms);
    REQUIRE_FALSE(starved.ok());
    CHECK(starved.error().message.find("slot") != std::string::npos);
    // The one background slot busy: a second background request waits for it.
    std::thread background(
        [&] { CHECK(client.send(get("/sleep?ms=1000"), 5s, SlotPool::background).ok()); });
    std::this_thread::sleep_for(150ms);
    auto second = client.send(get("/echo"), 200ms, SlotPool::background);
    REQUIRE_FALSE(second.ok());
    CHECK(second.error().message.find("background") != std::string::npos);
    for (auto& thread : busy) thread.join();
    background.join();
}

TEST_CASE("HttpClient: response size cap") {
    HttpClientOptions options = trusting();
    options.max_response_bytes = 1000;
    HttpClient client(options);
    auto fits = client.send(get("/big?n=1000"), 5s);
    REQUIRE(fits.ok());
    CHECK(fits->body.size() == 1000);
    auto too_big = client.send(get("/big?n=5000"), 5s);
    REQUIRE_FALSE(too_big.ok());
    CHECK(too_big.error().message.find("larger than 1000") != std::string::npos);
}

TEST_CASE("HttpClient: refusals never echo secrets; https only") {
    HttpClient client(trusting());
    HttpRequest request = get("/sleep?ms=2000");
    request.method = "POST";
    request.headers = {{"Authorization", "Bearer SECRET-TOKEN"}};
    request.body = "SECRET-BODY";
    auto timed_out = client.send(request, 200ms);
    REQUIRE_FALSE(timed_out.ok());

    // Nothing listens on port 1.
    request.url = "https://127.0.0.1:1/echo";
    auto refused = client.send(request, 2s);
    REQUIRE_FALSE(refused.ok());
    CHECK(refused.error().message.find("127.0.0.1:1") != std::string::npos);

    request.url = server().url("/echo");
    request.headers = {{"X-Injected", "SECRET-TOKEN\r\nX-Evil: 1"}};
    auto injected = client.send(request, 2s);
    REQUIRE_FALSE(injected.ok());
    CHECK(injected.error().message.find("X-Injected") != std::string::npos);

    for (const auto* error : {&timed_out.error(), &refused.error(), &injected.error()}) {
        CHECK(error->message.find("SECRET") == std::string::npos);
    }

    auto plain = client.send(HttpRequest{"GET", "http://127.0.0.1:1/echo", {}, {}}, 2s);
    REQUIRE_FALSE(plain.ok());
    CHECK(plain.error().message.find("http") != std::string::npos);
}

TEST_CASE("HttpClient: many threads through one client") {
    HttpClient client(trusting(4));
    std::atomic<int> succeeded{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < 8; ++t) {
        threads.emplace_back([&] {
            for (int i = 0; i < 5; ++i)
                if (auto r = client.send(get("/echo"), 5s); r.ok() && r->status == 200) ++succeeded;
        });
    }
    for (auto& thread : threads) thread.join();
    CHECK(succeeded == 40);
}
