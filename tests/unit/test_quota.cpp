// Route quotas: token bucket arithmetic on an injected clock, the local store under
// concurrency, the configuration keys, the decision line, the 429 drain, and the Redis store
// against a real redis-server (started here on a free loopback port, when installed).
#include <doctest/doctest.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "paasmilter/config.hpp"
#include "paasmilter/metrics.hpp"
#include "paasmilter/quota/local_store.hpp"
#include "paasmilter/quota/redis_store.hpp"
#include "paasmilter/quota/route_quota.hpp"
#include "paasmilter/quota/token_bucket.hpp"
#include "paasmilter/services.hpp"
#include "temp_dir.hpp"

using namespace paasmilter;
using paasmilter::testing::TempDir;
using namespace std::chrono_literals;

namespace {

constexpr int64_t kMinute = 60'000;
constexpr int64_t kHour = 60 * kMinute;

BucketSpec per_hour(double capacity) {
    return {"messages_per_hour", capacity, std::chrono::hours(1), false};
}
BucketSpec per_minute(double capacity) {
    return {"messages_per_minute", capacity, std::chrono::minutes(1), false};
}
BucketSpec recipients_per_day(double capacity) {
    return {"recipients_per_day", capacity, std::chrono::hours(24), true};
}

// A clock the test moves.
struct FakeClock {
    std::shared_ptr<std::atomic<int64_t>> ms = std::make_shared<std::atomic<int64_t>>(1'000'000);
    LocalQuotaStore::Clock clock() const {
        return [ms = ms] { return ms->load(); };
    }
    void advance(int64_t by) { *ms += by; }
};

}  // namespace

TEST_CASE("token bucket: full at first, refilled continuously, never above capacity") {
    TokenBucket bucket(3, std::chrono::hours(1), 0);
    CHECK(bucket.level(0) == 3);
    bucket.take(1, 0);
    CHECK(bucket.level(0) == 2);
    // 3 per hour: one token every 20 minutes, a third of one after 400 s.
    CHECK(bucket.level(20 * kMinute) == doctest::Approx(3));
    CHECK(bucket.level(400'000) == doctest::Approx(2 + 1.0 / 3));
    CHECK(bucket.level(10 * kHour) == 3);
    bucket.take(3, 0);  // a debit beyond the level empties it, no lower
    CHECK(bucket.level(0) == 0);
    CHECK(bucket.level(10 * kMinute) == doctest::Approx(0.5));
    // A clock that goes back refills nothing and takes nothing back.
    bucket.take(0, 10 * kMinute);
    CHECK(bucket.level(5 * kMinute) == doctest::Approx(0.5));
    SUBCASE("drain empties it; refill starts from 0") {
        bucket.drain(20 * kMinute);
        CHECK(bucket.level(20 * kMinute) == 0);
        CHECK(bucket.level(40 * kMinute) == doctest::Approx(1));
    }
    SUBCASE("a smaller capacity (a reload) keeps at most the new capacity") {
        TokenBucket big(100, std::chrono::hours(1), 0);
        big.resize(30, std::chrono::minutes(1), 0);
        CHECK(big.level(0) == 30);
        big.take(30, 0);
        CHECK(big.level(kMinute / 2) == doctest::Approx(15));
    }
}

TEST_CASE("take_all: every bucket or none") {
    TokenBucket minute(30, std::chrono::minutes(1), 0);
    TokenBucket day(10, std::chrono::hours(24), 0);
    std::vector<TokenBucket*> buckets = {&minute, &day};
    std::vector<size_t> short_of;
    CHECK_FALSE(take_all(buckets, std::vector<double>{1, 11}, 0, &short_of));
    CHECK(short_of == std::vector<size_t>{1});
    CHECK(minute.level(0) == 30);  // nothing taken from the one that had enough
    CHECK(day.level(0) == 10);
    CHECK(take_all(buckets, std::vector<double>{1, 10}, 0));
    CHECK(minute.level(0) == 29);
    CHECK(day.level(0) == 0);
    short_of.clear();
    CHECK_FALSE(take_all(buckets, std::vector<double>{1, 1}, 0, &short_of));
    CHECK(short_of == std::vector<size_t>{1});
    CHECK(minute.level(0) == 29);
}

TEST_CASE("quota_amounts: 1 per message bucket, the remote recipients per recipient bucket") {
    std::vector<BucketSpec> buckets = {per_minute(30), recipients_per_day(10000)};
    CHECK(quota_amounts(buckets, 7) == std::vector<double>{1, 7});
}

TEST_CASE("local store: a burst takes exactly the capacity, refill lets one more through") {
    FakeClock time;
    LocalQuotaStore store(1.0, time.clock());
    std::vector<BucketSpec> buckets = {per_minute(30), per_hour(3)};
    const std::vector<double> one = {1, 1};
    int granted = 0;
    for (int i = 0; i < 8; ++i) granted += store.take("acs-api", buckets, one).granted;
    CHECK(granted == 3);
    QuotaTake refused = store.take("acs-api", buckets, one);
    CHECK_FALSE(refused.granted);
    CHECK(refused.short_of == std::vector<size_t>{1});
    CHECK(refused.levels[0] == doctest::Approx(27));
    CHECK(refused.levels[1] == doctest::Approx(0));
    CHECK(refused.store == "local");
    // Other routes have their own buckets.
    CHECK(store.take("graph", buckets, one).granted);
    time.advance(20 * kMinute);
    CHECK(store.take("acs-api", buckets, one).granted);
    CHECK_FALSE(store.take("acs-api", buckets, one).granted);
}

TEST_CASE("local store: a 429 drains every bucket and blocks takes for its Retry-After") {
    FakeClock time;
    LocalQuotaStore store(1.0, time.clock());
    std::vector<BucketSpec> buckets = {per_minute(60), per_hour(1000)};
    const std::vector<double> one = {1, 1};
    CHECK(store.take("acs-api", buckets, one).granted);
    store.drain("acs-api", buckets, 5000ms);
    QuotaTake blocked = store.take("acs-api", buckets, one);
    CHECK_FALSE(blocked.granted);
    CHECK(blocked.blocked == 5000ms);
    CHECK(blocked.levels == std::vector<double>{0, 0});
    time.advance(4000);
    CHECK_FALSE(store.take("acs-api", buckets, one).granted);  // still throttled
    time.advance(1000);
    // Retry-After over; 5 s refilled 5 of 60/min and 1.4 of 1000/h: one message goes.
    QuotaTake after = store.take("acs-api", buckets, one);
    CHECK(after.granted);
    CHECK(after.blocked == 0ms);
    CHECK(after.levels[0] == doctest::Approx(4));
    SUBCASE("without Retry-After: empty buckets, refilled at their rate") {
        store.drain("acs-api", buckets, 0ms);
        CHECK_FALSE(store.take("acs-api", buckets, one).granted);
        time.advance(1000);  // 1 of 60/min, but only 0.28 of 1000/h
        CHECK_FALSE(store.take("acs-api", buckets, one).granted);
        time.advance(3000);
        CHECK(store.take("acs-api", buckets, one).granted);
    }
}

TEST_CASE("local store: a share of each bucket, and debits down to zero") {
    FakeClock time;
    LocalQuotaStore half(0.5, time.clock());
    CHECK(half.name() == "local share 1/2");
    std::vector<BucketSpec> buckets = {per_hour(10)};
    int granted = 0;
    for (int i = 0; i < 10; ++i) granted += half.take("r", buckets, std::vector<double>{1}).granted;
    CHECK(granted == 5);
    LocalQuotaStore shadow(0.5, time.clock());
    shadow.debit("r", buckets, std::vector<double>{3});
    CHECK(shadow.peek("r", buckets).levels[0] == doctest::Approx(2));
    shadow.debit("r", buckets, std::vector<double>{7});
    CHECK(shadow.peek("r", buckets).levels[0] == 0);
    CHECK(shadow.peek("r", buckets).capacities[0] == 5);
}

TEST_CASE("local store: concurrent takes never grant more than the capacity") {
    FakeClock time;  // frozen: no refill during the test
    LocalQuotaStore store(1.0, time.clock());
    std::vector<BucketSpec> buckets = {per_hour(500), recipients_per_day(1200)};
    std::atomic<int> granted{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < 8; ++t) {
        threads.emplace_back([&] {
            for (int i = 0; i < 1000; ++i) {
                if (store.take("acs-api", buckets, std::vector<double>{1, 2}).granted) ++granted;
            }
        });
    }
    for (auto& thread : threads) thread.join();
    CHECK(granted == 500);
    QuotaTake left = store.peek("acs-api", buckets);
    CHECK(left.levels[0] == 0);
    CHECK(left.levels[1] == 200);
}

TEST_CASE("take_route_quota: the decision line's fields and the metrics") {
    FakeClock time;
    LocalQuotaStore store(1.0, time.clock());
    ApiSettings api;
    api.quota = {per_minute(30), per_hour(2)};
    RouteQuotaCheck first = take_route_quota(store, "quota-test", api, 1);
    CHECK(first.granted);
    CHECK(first.log == ", quota=messages_per_minute:29/30,messages_per_hour:1/2");
    CHECK(take_route_quota(store, "quota-test", api, 1).granted);
    RouteQuotaCheck refused = take_route_quota(store, "quota-test", api, 1);
    CHECK_FALSE(refused.granted);
    CHECK(refused.log ==
          ", quota=refused (messages_per_hour empty: 0 of 2 left, needs 1; store=local)");
    CHECK(refused.detail == "route quota exhausted: messages_per_hour");
    SUBCASE("a route without buckets is always granted, silently") {
        ApiSettings none;
        RouteQuotaCheck check = take_route_quota(store, "other", none, 100);
        CHECK(check.granted);
        CHECK(check.log.empty());
    }
    SUBCASE("throttled") {
        store.drain("quota-test", api.quota, 2500ms);
        RouteQuotaCheck check = take_route_quota(store, "quota-test", api, 1);
        CHECK(check.log.find("quota=refused (throttled by the service: no request for 3 s, "
                             "messages_per_minute empty: 0 of 30 left, needs 1") !=
              std::string::npos);
    }
}

TEST_CASE("a 429 to a POST drains the route's buckets; other answers do not") {
    auto store = std::make_shared<LocalQuotaStore>();
    std::vector<BucketSpec> buckets = {per_hour(100)};
    long status = 202;
    std::string retry_after;
    ApiHooks hooks;
    hooks.wall_clock = [] { return std::chrono::system_clock::now(); };
    hooks.send = [&](const HttpRequest&, std::chrono::milliseconds) -> Result<HttpResponse> {
        HttpResponse response;
        response.status = status;
        if (!retry_after.empty()) response.headers.emplace_back("Retry-After", retry_after);
        return response;
    };
    ApiHooks drained = drain_quota_on_throttle(hooks, store, "acs-api", buckets);
    HttpRequest post;
    post.method = "POST";
    HttpRequest get;
    get.method = "GET";
    CHECK(drained.send(post, 1s)->status == 202);
    CHECK(store->peek("acs-api", buckets).levels[0] == 100);
    status = 429;
    CHECK(drained.send(get, 1s)->status == 429);  // a status check: not the send quota
    CHECK(store->peek("acs-api", buckets).levels[0] == 100);
    retry_after = "30";
    CHECK(drained.send(post, 1s)->status == 429);
    QuotaTake after = store->peek("acs-api", buckets);
    CHECK(after.levels[0] < 0.01);
    CHECK(after.blocked > 29s);
    CHECK(after.blocked <= 30s);
    SUBCASE("no store or no buckets: the hooks unchanged") {
        ApiHooks same = drain_quota_on_throttle(hooks, nullptr, "acs-api", buckets);
        CHECK(same.send(post, 1s)->status == 429);
    }
}

namespace {

const std::string kConfig = R"(
[milter]
socket = "inet:10025@127.0.0.1"

[routes.acs-smtp]
action = "relay"

[routes.acs-api]
action = "api"
connection_string_file = "secrets/acs.conn"
sender = "DoNotReply@contoso.azurecomm.net"
quota_messages_per_minute = 30
quota_messages_per_hour = 100
on_quota = "relay:acs-smtp"
)";

std::string replace(std::string text, const std::string& from, const std::string& to) {
    auto pos = text.find(from);
    REQUIRE(pos != std::string::npos);
    return text.replace(pos, from.size(), to);
}

}  // namespace

TEST_CASE("quota configuration: route buckets, on_quota and [quota]") {
    TempDir dir;
    dir.write("secrets/acs.conn",
              "endpoint=https://contoso.communication.azure.com/;accesskey=c2VjcmV0\n");
    ::chmod((dir.path() / "secrets/acs.conn").c_str(), 0600);
    const std::string path = (dir.path() / "paas-milter.toml").string();
    auto error_of = [&](const std::string& text) {
        auto config = load_config(dir.write("paas-milter.toml", text));
        return config ? std::string() : config.error().to_string();
    };

    SUBCASE("buckets in the order minute, hour, day; on_quota") {
        auto config =
            load_config(dir.write("paas-milter.toml", replace(kConfig, "on_quota",
                                                              "quota_recipients_per_day = 10000\n"
                                                              "on_quota")));
        REQUIRE_MESSAGE(config.ok(), (config.ok() ? "" : config.error().to_string()));
        const ApiSettings& api = *(*config)->find_route("acs-api")->api;
        REQUIRE(api.quota.size() == 3);
        CHECK(api.quota[0].name == "messages_per_minute");
        CHECK(api.quota[0].capacity == 30);
        CHECK(api.quota[0].window == std::chrono::minutes(1));
        CHECK(api.quota[1].name == "messages_per_hour");
        CHECK(api.quota[1].window == std::chrono::hours(1));
        CHECK(api.quota[2].name == "recipients_per_day");
        CHECK(api.quota[2].per_recipient);
        CHECK(api.quota[2].window == std::chrono::hours(24));
        CHECK(to_string(api.on_quota) == "relay:acs-smtp");
        CHECK((*config)->quota.store.empty());
        CHECK((*config)->quota.fleet_size == 1);
        CHECK_FALSE((*config)->quota_store);  // only with a ServiceRegistry
    }
    SUBCASE("defaults: no bucket, on_quota tempfail") {
        auto text = replace(kConfig, "quota_messages_per_minute = 30\n", "");
        text = replace(text, "quota_messages_per_hour = 100\n", "");
        text = replace(text, "on_quota = \"relay:acs-smtp\"\n", "");
        auto config = load_config(dir.write("paas-milter.toml", text));
        REQUIRE(config.ok());
        CHECK((*config)->find_route("acs-api")->api->quota.empty());
        CHECK(to_string((*config)->find_route("acs-api")->api->on_quota) == "tempfail");
    }
    SUBCASE("[quota] with a Redis store") {
        dir.write("secrets/redis.password", "s3cret\n");
        ::chmod((dir.path() / "secrets/redis.password").c_str(), 0600);
        auto config = load_config(
            dir.write("paas-milter.toml", kConfig + "\n[quota]\nstore = \"redis://[::1]:6380/2\"\n"
                                                    "password_file = \"secrets/redis.password\"\n"
                                                    "fleet_size = 3\nkey_prefix = \"pm:\"\n"));
        REQUIRE_MESSAGE(config.ok(), (config.ok() ? "" : config.error().to_string()));
        const QuotaSettings& quota = (*config)->quota;
        CHECK(quota.host == "::1");
        CHECK(quota.port == 6380);
        CHECK(quota.database == 2);
        CHECK(quota.password == "s3cret");
        CHECK(quota.fleet_size == 3);
        CHECK(quota.key_prefix == "pm:");
        CHECK(redis_url(quota) == "redis://[::1]:6380/2");
        CHECK((*config)->warnings.empty());
    }
    SUBCASE("a Redis store on another host without a password is warned about") {
        auto config = load_config(
            dir.write("paas-milter.toml", kConfig + "\n[quota]\nstore = \"redis://10.0.0.5\"\n"));
        REQUIRE(config.ok());
        REQUIRE((*config)->warnings.size() == 1);
        CHECK((*config)->warnings[0].find(path + ":17: quota.store: 10.0.0.5 is not a loopback "
                                                 "address and has no password_file") == 0);
    }
    SUBCASE("errors name the file, the line and the key") {
        CHECK(error_of(replace(kConfig, "quota_messages_per_hour = 100",
                               "quota_messages_per_hour = 0")) ==
              path +
                  ":13: routes.acs-api.quota_messages_per_hour: 0 is not between 1 and "
                  "1000000000");
        CHECK(error_of(replace(kConfig, "quota_messages_per_minute = 30",
                               "quota_messages_per_minute = \"30\"")) ==
              path + ":12: routes.acs-api.quota_messages_per_minute: expected an integer");
        CHECK(error_of(replace(kConfig, "\"relay:acs-smtp\"", "\"reject\"")) ==
              path +
                  ":14: routes.acs-api.on_quota: \"reject\" is not tempfail, hold or "
                  "relay:ROUTE");
        CHECK(error_of(replace(kConfig, "\"relay:acs-smtp\"", "\"bounce\"")) ==
              path +
                  ":14: routes.acs-api.on_quota: \"bounce\" is not tempfail, hold, reject "
                  "or relay:ROUTE");
        CHECK(error_of(replace(kConfig, "\"relay:acs-smtp\"", "\"relay:acs-api\"")) ==
              path +
                  ":8: routes.acs-api: fallback \"relay:acs-api\" does not name a route with "
                  "action = \"relay\"");
        CHECK(error_of(replace(kConfig, "action = \"relay\"",
                               "action = \"relay\"\nquota_messages_per_hour = 5")) ==
              path +
                  ":7: routes.acs-smtp.quota_messages_per_hour: only valid with action = "
                  "\"api\"");
        CHECK(error_of(kConfig + "\n[quota]\nstore = \"redis://:pw@127.0.0.1:6379\"\n") ==
              path +
                  ":17: quota.store: \"redis://***@127.0.0.1:6379\" has a user or password: "
                  "put the password in quota.password_file");
        CHECK(error_of(kConfig + "\n[quota]\nstore = \"rediss://127.0.0.1\"\n")
                  .find(path + ":17: quota.store: \"rediss://127.0.0.1\" TLS (rediss://) is not "
                               "supported") == 0);
        CHECK(error_of(kConfig + "\n[quota]\nstore = \"127.0.0.1:6379\"\n") ==
              path + ":17: quota.store: \"127.0.0.1:6379\" is not \"redis://HOST:PORT[/DB]\"");
        CHECK(error_of(kConfig + "\n[quota]\nstore = \"redis://127.0.0.1:99999\"\n") ==
              path + ":17: quota.store: \"redis://127.0.0.1:99999\" has no valid port \"99999\"");
        CHECK(error_of(kConfig + "\n[quota]\nstore = \"redis://::1:6379\"\n")
                  .find("has an IPv6 host: write it in brackets") != std::string::npos);
        CHECK(error_of(kConfig + "\n[quota]\nfleet_size = 0\n") ==
              path + ":17: quota.fleet_size: 0 is not between 1 and 1000");
        // 30 a minute shared by 40 gateways: each would keep 0.75 tokens and grant nothing.
        CHECK(error_of(kConfig + "\n[quota]\nfleet_size = 40\n") ==
              path +
                  ":8: routes.acs-api.quota_messages_per_minute: 30 shared by quota.fleet_size = "
                  "40 gateways leaves each less than one token: raise it to at least 40 or lower "
                  "fleet_size");
        CHECK(error_of(kConfig + "\n[quota]\npassword_file = \"x\"\n") ==
              path + ":17: quota.password_file: only with quota.store");
        CHECK(error_of(kConfig + "\n[quota]\nkey_prefix = \"a b\"\n")
                  .find(path + ":17: quota.key_prefix: \"a b\" may hold printable ASCII only") ==
              0);
        CHECK(error_of(kConfig + "\n[quota]\nstores = \"redis://127.0.0.1\"\n") ==
              path + ":17: unknown key \"quota.stores\"");
        CHECK(error_of("quota = 3\n" + kConfig) == path + ":1: quota: expected a table");
        CHECK(error_of(kConfig + "\n[quota]\nstore = \"redis://127.0.0.1\"\n"
                                 "password_file = \"secrets/missing\"\n")
                  .find(path + ":18: quota.password_file: cannot read ") == 0);
    }
    SUBCASE("on_quota without a bucket is warned about") {
        auto text = replace(kConfig, "quota_messages_per_minute = 30\n", "");
        text = replace(text, "quota_messages_per_hour = 100\n", "");
        auto config = load_config(dir.write("paas-milter.toml", text));
        REQUIRE(config.ok());
        REQUIRE((*config)->warnings.size() == 1);
        CHECK((*config)->warnings[0] == path +
                                            ":12: routes.acs-api.on_quota: the route has no "
                                            "quota_* bucket, so it never applies");
    }
    SUBCASE("the daemon gets a store, the same one after a reload with the same [quota]") {
        ServiceRegistry services;
        auto first = load_config(dir.write("paas-milter.toml", kConfig), &services);
        REQUIRE(first.ok());
        REQUIRE((*first)->quota_store);
        CHECK((*first)->quota_store->name() == "local");
        auto second = load_config(path, &services);
        REQUIRE(second.ok());
        CHECK((*second)->quota_store == (*first)->quota_store);
        auto shared = load_config(dir.write("paas-milter.toml", kConfig + "\n[quota]\n"
                                                                          "fleet_size = 4\n"),
                                  &services);
        REQUIRE(shared.ok());
        CHECK((*shared)->quota_store != (*first)->quota_store);
        CHECK((*shared)->quota_store->name() == "local share 1/4");
        auto without = replace(kConfig, "quota_messages_per_minute = 30\n", "");
        without = replace(without, "quota_messages_per_hour = 100\n", "");
        without = replace(without, "on_quota = \"relay:acs-smtp\"\n", "");
        auto none = load_config(dir.write("paas-milter.toml", without), &services);
        REQUIRE(none.ok());
        CHECK_FALSE((*none)->quota_store);  // no route has buckets
    }
}

TEST_CASE("parse_redis_url") {
    auto ok = parse_redis_url("redis://localhost");
    REQUIRE(ok.ok());
    CHECK(ok->host == "localhost");
    CHECK(ok->port == 6379);
    CHECK(ok->database == 0);
    auto full = parse_redis_url("redis://127.0.0.1:6390/3");
    REQUIRE(full.ok());
    CHECK(full->port == 6390);
    CHECK(full->database == 3);
    CHECK_FALSE(parse_redis_url("redis://").ok());
    CHECK_FALSE(parse_redis_url("redis://h:0").ok());
    CHECK_FALSE(parse_redis_url("redis://h/x").ok());
    CHECK_FALSE(parse_redis_url("redis://[::1").ok());
}

namespace {

int free_loopback_port() {
    int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    REQUIRE(fd >= 0);
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    REQUIRE(::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof address) == 0);
    socklen_t length = sizeof address;
    REQUIRE(::getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) == 0);
    ::close(fd);
    return ntohs(address.sin_port);
}

bool can_connect(int port) {
    int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_port = htons(static_cast<uint16_t>(port));
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    const bool ok = ::connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof address) == 0;
    ::close(fd);
    return ok;
}

// Debian's redis-server on 127.0.0.1:PORT with nothing persisted, in a temporary directory;
// killed when the object goes. Never the system's instance.
class RedisServer {
  public:
    explicit RedisServer(int port) : port_(port) { start(); }
    ~RedisServer() { stop(); }
    RedisServer(const RedisServer&) = delete;
    RedisServer& operator=(const RedisServer&) = delete;

    void start() {
        std::vector<std::string> args = {"redis-server",
                                         "--port",
                                         std::to_string(port_),
                                         "--bind",
                                         "127.0.0.1",
                                         "--save",
                                         "",
                                         "--appendonly",
                                         "no",
                                         "--dir",
                                         dir_.path().string(),
                                         "--logfile",
                                         (dir_.path() / "redis.log").string()};
        std::vector<char*> argv;
        for (auto& arg : args) argv.push_back(arg.data());
        argv.push_back(nullptr);
        REQUIRE(posix_spawn(&pid_, "/usr/bin/redis-server", nullptr, nullptr, argv.data(),
                            environ) == 0);
        for (int i = 0; i < 200 && !can_connect(port_); ++i) std::this_thread::sleep_for(20ms);
        REQUIRE(can_connect(port_));
    }
    void stop() {
        if (pid_ <= 0) return;
        ::kill(pid_, SIGKILL);
        ::waitpid(pid_, nullptr, 0);
        pid_ = -1;
    }

  private:
    int port_;
    TempDir dir_;
    pid_t pid_ = -1;
};

}  // namespace

TEST_CASE("redis store: shared buckets, atomic takes, 429 drains, local shares when it is down") {
    if (!std::filesystem::exists("/usr/bin/redis-server")) {
        MESSAGE("redis-server is not installed: skipped");
        return;
    }
    const int port = free_loopback_port();
    RedisServer redis(port);
    QuotaSettings settings;
    settings.store = "redis://127.0.0.1:" + std::to_string(port);
    settings.host = "127.0.0.1";
    settings.port = port;
    settings.fleet_size = 2;
    settings.key_prefix = "unit-test:";
    FakeClock time;  // for the local shares and the reconnect backoff; Redis has its own
    RedisQuotaStore::Options options;
    options.clock = time.clock();
    RedisQuotaStore gateway_a(settings, options);
    RedisQuotaStore gateway_b(settings, options);
    CHECK(gateway_a.shared());
    CHECK(gateway_a.name() == "redis://127.0.0.1:" + std::to_string(port) + "/0");
    std::vector<BucketSpec> buckets = {per_minute(600), per_hour(10)};
    const std::vector<double> one = {1, 1};

    // Two gateways, one bucket of 10: exactly 10 between them, whoever asks.
    std::atomic<int> granted{0};
    std::vector<std::thread> threads;
    for (RedisQuotaStore* gateway : {&gateway_a, &gateway_b}) {
        for (int t = 0; t < 2; ++t) {
            threads.emplace_back([&, gateway] {
                for (int i = 0; i < 4; ++i)
                    granted += gateway->take("acs-api", buckets, one).granted;
            });
        }
    }
    for (auto& thread : threads) thread.join();
    CHECK(granted == 10);
    QuotaTake refused = gateway_a.take("acs-api", buckets, one);
    CHECK_FALSE(refused.granted);
    CHECK(refused.short_of == std::vector<size_t>{1});
    CHECK(refused.levels[1] < 0.1);
    CHECK(refused.capacities[1] == 10);
    CHECK(refused.store == gateway_a.name());

    auto peeked = peek_shared_quota(settings, "acs-api", buckets, 1s);
    REQUIRE(peeked.ok());
    CHECK(peeked->levels[0] > 580);  // refilled at 10 a second
    CHECK(peeked->levels[1] < 0.1);
    CHECK_FALSE(peeked->granted);

    SUBCASE("a 429 seen by one gateway drains the bucket for the whole fleet") {
        std::vector<BucketSpec> other = {per_hour(100)};
        CHECK(gateway_b.take("graph", other, std::vector<double>{1}).granted);
        gateway_a.drain("graph", other, 3000ms);
        QuotaTake blocked = gateway_b.take("graph", other, std::vector<double>{1});
        CHECK_FALSE(blocked.granted);
        CHECK(blocked.blocked > 2000ms);
        CHECK(blocked.levels[0] < 0.1);
    }
    SUBCASE("Redis down: each gateway falls back to its share, debited by what it took") {
        std::vector<BucketSpec> fresh = {per_hour(10)};
        // Gateway A takes 3 through Redis: its local share (5) keeps 2.
        for (int i = 0; i < 3; ++i)
            CHECK(gateway_a.take("r2", fresh, std::vector<double>{1}).granted);
        redis.stop();
        QuotaTake local = gateway_a.take("r2", fresh, std::vector<double>{1});
        CHECK(local.granted);
        CHECK(local.local_fallback);
        CHECK(local.store == "local share 1/2 (" + gateway_a.name() + " unreachable)");
        CHECK_FALSE(gateway_a.shared());
        CHECK(gateway_a.take("r2", fresh, std::vector<double>{1}).granted);
        CHECK_FALSE(gateway_a.take("r2", fresh, std::vector<double>{1}).granted);
        // Gateway B took nothing of r2: its whole share.
        int b = 0;
        for (int i = 0; i < 8; ++i)
            b += gateway_b.take("r2", fresh, std::vector<double>{1}).granted;
        CHECK(b == 5);
        CHECK_FALSE(peek_shared_quota(settings, "r2", fresh, 200ms).ok());

        // Back: after the backoff the next take reaches Redis again, with its state gone
        // (nothing was persisted), so the bucket is full there.
        redis.start();
        CHECK(gateway_a.take("r2", fresh, std::vector<double>{1}).local_fallback);  // backoff
        time.advance(1000);
        QuotaTake again = gateway_a.take("r2", fresh, std::vector<double>{1});
        CHECK_FALSE(again.local_fallback);
        CHECK(again.granted);
        CHECK(gateway_a.shared());
    }
}
