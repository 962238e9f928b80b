#include "paasmilter/quota/redis_store.hpp"

#include <hiredis/hiredis.h>
#include <sys/time.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstdlib>

#include <fmt/format.h>

#include "paasmilter/c_handle.hpp"
#include "paasmilter/crypto.hpp"
#include "paasmilter/log.hpp"
#include "paasmilter/metrics.hpp"

namespace paasmilter {

namespace {

// KEYS[1]: the route's throttle key (a 429's Retry-After as its TTL); KEYS[2..]: its buckets,
// hashes {level, ts}. ARGV[1]: "take", "drain" or "peek"; ARGV[2]: for drain, block takes for
// this many ms; then per bucket i: capacity (ARGV[3i]), window in ms (ARGV[3i+1]) and the
// amount to take (ARGV[3i+2]). Returns {granted 0/1, ms left of the throttle, levels...} with
// the levels as strings (Lua numbers in a reply would be truncated to integers). The
// arithmetic is TokenBucket's (token_bucket.cpp), on Redis' clock.
constexpr std::string_view kScript = R"lua(
if redis.replicate_commands then redis.replicate_commands() end -- Redis < 5: TIME, then writes
local mode = ARGV[1]
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local n = #KEYS - 1
local levels = {}
for i = 1, n do
  local capacity = tonumber(ARGV[3 * i])
  local window = tonumber(ARGV[3 * i + 1])
  local state = redis.call('HMGET', KEYS[i + 1], 'level', 'ts')
  local level, ts = tonumber(state[1]), tonumber(state[2])
  if level == nil or ts == nil then
    level = capacity
  elseif now > ts then
    level = level + (now - ts) * capacity / window
  end
  if level > capacity then level = capacity end
  levels[i] = level
end
local blocked = redis.call('PTTL', KEYS[1])
if blocked < 0 then blocked = 0 end
local granted = 0
if mode == 'take' and blocked == 0 then
  granted = 1
  for i = 1, n do
    if levels[i] < tonumber(ARGV[3 * i + 2]) then granted = 0 end
  end
  if granted == 1 then
    for i = 1, n do levels[i] = levels[i] - tonumber(ARGV[3 * i + 2]) end
  end
elseif mode == 'drain' then
  for i = 1, n do levels[i] = 0 end
  local block = tonumber(ARGV[2])
  if block > blocked then
    redis.call('SET', KEYS[1], '1', 'PX', block)
    blocked = block
  end
end
if granted == 1 or mode == 'drain' then
  for i = 1, n do
    redis.call('HSET', KEYS[i + 1], 'level', tostring(levels[i]), 'ts', tostring(now))
    redis.call('PEXPIRE', KEYS[i + 1], tonumber(ARGV[3 * i + 1]))
  end
end
local out = {granted, blocked}
for i = 1, n do out[i + 2] = tostring(levels[i]) end
return out
)lua";

const std::string& script_sha() {
    static const std::string sha = [] {
        auto digest = sha1(kScript);
        return digest ? hex_encode(*digest) : std::string();
    }();
    return sha;
}

using ContextPtr = std::unique_ptr<redisContext, Deleter<redisFree>>;
using ReplyPtr = std::unique_ptr<redisReply, Deleter<freeReplyObject>>;

timeval to_timeval(std::chrono::milliseconds ms) {
    timeval tv{};
    tv.tv_sec = static_cast<time_t>(ms.count() / 1000);
    tv.tv_usec = static_cast<suseconds_t>((ms.count() % 1000) * 1000);
    return tv;
}

std::string reply_text(const redisReply& reply) {
    return std::string(reply.str ? reply.str : "", reply.str ? reply.len : 0);
}

}  // namespace

// One hiredis connection: connected, authenticated and on its database, or not made.
class RedisConnection {
  public:
    static Result<std::unique_ptr<RedisConnection>> open(const QuotaSettings& settings,
                                                         std::chrono::milliseconds timeout) {
        ContextPtr context(
            redisConnectWithTimeout(settings.host.c_str(), settings.port, to_timeval(timeout)));
        if (!context) return make_error("cannot allocate a Redis context");
        if (context->err) return make_error(context->errstr);
        if (redisSetTimeout(context.get(), to_timeval(timeout)) != REDIS_OK) {
            return make_error(context->err ? context->errstr : "cannot set the timeout");
        }
        redisEnableKeepAlive(context.get());
        auto connection = std::unique_ptr<RedisConnection>(new RedisConnection(std::move(context)));
        if (!settings.password.empty()) {
            // The password is an argument, never part of an error text.
            auto auth = connection->command({"AUTH", settings.password});
            if (!auth) return make_error("AUTH: " + auth.error().message);
        }
        if (settings.database != 0) {
            auto select = connection->command({"SELECT", std::to_string(settings.database)});
            if (!select) return make_error("SELECT: " + select.error().message);
        }
        return connection;
    }

    // Any reply but an error; a transport failure leaves the connection unusable.
    Result<ReplyPtr> command(const std::vector<std::string>& args) {
        std::vector<const char*> argv;
        std::vector<size_t> lengths;
        for (const std::string& arg : args) {
            argv.push_back(arg.data());
            lengths.push_back(arg.size());
        }
        ReplyPtr reply(static_cast<redisReply*>(redisCommandArgv(
            context_.get(), static_cast<int>(argv.size()), argv.data(), lengths.data())));
        if (!reply) {
            return make_error(context_->err ? std::string(context_->errstr) : "no reply");
        }
        if (reply->type == REDIS_REPLY_ERROR) return make_error(reply_text(*reply));
        return reply;
    }

    // The script, by its SHA-1 (EVALSHA); by its text when Redis does not have it yet
    // (a new or restarted server, SCRIPT FLUSH), which also makes Redis keep it.
    Result<ReplyPtr> script(const std::vector<std::string>& keys_and_args, size_t key_count) {
        std::vector<std::string> args = {"EVALSHA", script_sha(), std::to_string(key_count)};
        args.insert(args.end(), keys_and_args.begin(), keys_and_args.end());
        auto reply = command(args);
        if (!reply && reply.error().message.starts_with("NOSCRIPT")) {
            args[0] = "EVAL";
            args[1] = std::string(kScript);
            reply = command(args);
        }
        return reply;
    }

  private:
    explicit RedisConnection(ContextPtr context) : context_(std::move(context)) {}
    ContextPtr context_;
};

Result<RedisAddress> parse_redis_url(std::string_view url) {
    constexpr std::string_view kScheme = "redis://";
    if (url.starts_with("rediss://")) {
        return make_error(
            "TLS (rediss://) is not supported; reach Redis on loopback or a "
            "private network, or through a TLS tunnel");
    }
    if (!url.starts_with(kScheme)) return make_error("is not \"redis://HOST:PORT[/DB]\"");
    std::string_view rest = url.substr(kScheme.size());
    if (rest.find('@') != std::string_view::npos) {
        return make_error("has a user or password: put the password in quota.password_file");
    }
    RedisAddress address;
    std::string_view hostport = rest.substr(0, rest.find('/'));
    if (size_t slash = rest.find('/'); slash != std::string_view::npos) {
        std::string_view db = rest.substr(slash + 1);
        if (!db.empty()) {
            auto [end, ec] = std::from_chars(db.data(), db.data() + db.size(), address.database);
            if (ec != std::errc() || end != db.data() + db.size() || address.database < 0) {
                return make_error(fmt::format("has no valid database number \"{}\"", db));
            }
        }
    }
    std::string_view port;
    if (hostport.starts_with('[')) {
        size_t close = hostport.find(']');
        if (close == std::string_view::npos) return make_error("has an unclosed '[' in its host");
        address.host = std::string(hostport.substr(1, close - 1));
        std::string_view after = hostport.substr(close + 1);
        if (!after.empty()) {
            if (!after.starts_with(':')) return make_error("has junk after its host");
            port = after.substr(1);
        }
    } else {
        size_t colon = hostport.rfind(':');
        address.host = std::string(hostport.substr(0, colon));
        if (colon != std::string_view::npos) port = hostport.substr(colon + 1);
        if (address.host.find(':') != std::string::npos) {
            return make_error("has an IPv6 host: write it in brackets, redis://[::1]:6379");
        }
    }
    if (address.host.empty()) return make_error("has no host");
    if (!port.empty()) {
        auto [end, ec] = std::from_chars(port.data(), port.data() + port.size(), address.port);
        if (ec != std::errc() || end != port.data() + port.size() || address.port < 1 ||
            address.port > 65535) {
            return make_error(fmt::format("has no valid port \"{}\"", port));
        }
    }
    return address;
}

std::string redis_url(const QuotaSettings& settings) {
    const bool v6 = settings.host.find(':') != std::string::npos;
    return fmt::format("redis://{}{}{}:{}/{}", v6 ? "[" : "", settings.host, v6 ? "]" : "",
                       settings.port, settings.database);
}

namespace {

std::vector<std::string> script_arguments(const QuotaSettings& settings, std::string_view route,
                                          std::span<const BucketSpec> buckets,
                                          std::span<const double> amounts, const char* mode,
                                          std::chrono::milliseconds block) {
    // A hash tag ({route}): every key of one script is in one slot of a Redis Cluster.
    const std::string base = fmt::format("{}{{{}}}:", settings.key_prefix, route);
    std::vector<std::string> args;
    args.push_back(base + "throttled");
    for (const BucketSpec& bucket : buckets) args.push_back(base + bucket.name);
    args.push_back(mode);
    args.push_back(std::to_string(std::max<int64_t>(0, block.count())));
    for (size_t i = 0; i < buckets.size(); ++i) {
        args.push_back(fmt::format("{}", buckets[i].capacity));
        args.push_back(std::to_string(std::max<int64_t>(1, buckets[i].window.count())));
        args.push_back(fmt::format("{}", i < amounts.size() ? amounts[i] : 0.0));
    }
    return args;
}

Result<QuotaTake> parse_script_reply(const redisReply& reply, std::span<const BucketSpec> buckets,
                                     std::span<const double> amounts, const std::string& store) {
    if (reply.type != REDIS_REPLY_ARRAY || reply.elements != buckets.size() + 2 ||
        reply.element[0]->type != REDIS_REPLY_INTEGER ||
        reply.element[1]->type != REDIS_REPLY_INTEGER) {
        return make_error("unexpected answer to the quota script");
    }
    QuotaTake take;
    take.store = store;
    take.granted = reply.element[0]->integer == 1;
    take.blocked = std::chrono::milliseconds(reply.element[1]->integer);
    for (size_t i = 0; i < buckets.size(); ++i) {
        const redisReply& level = *reply.element[i + 2];
        if (level.type != REDIS_REPLY_STRING) return make_error("unexpected bucket level");
        take.levels.push_back(std::strtod(reply_text(level).c_str(), nullptr));
        take.capacities.push_back(buckets[i].capacity);
    }
    // Refused: the levels are those before the take.
    if (!take.granted) take.short_of = buckets_short_of(take.levels, amounts);
    return take;
}

}  // namespace

RedisQuotaStore::RedisQuotaStore(QuotaSettings settings) : RedisQuotaStore(settings, Options{}) {}

RedisQuotaStore::RedisQuotaStore(QuotaSettings settings, Options options)
    : settings_(std::move(settings)),
      options_(std::move(options)),
      url_(redis_url(settings_)),
      fallback_(1.0 / std::max(1, settings_.fleet_size), options_.clock),
      backoff_(options_.first_backoff) {
    std::lock_guard lock(mutex_);
    auto opened = RedisConnection::open(settings_, options_.timeout);
    if (opened) {
        connection_ = std::move(*opened);
        came_up();
    } else {
        went_down(opened.error().message);
    }
}

RedisQuotaStore::~RedisQuotaStore() = default;

bool RedisQuotaStore::shared() const {
    return up_.load(std::memory_order_relaxed);
}

void RedisQuotaStore::went_down(const std::string& why) {
    if (up_ || !reported_) {
        log_warning("quota store {} unreachable ({}): using the local share (1/{}) of each bucket",
                    url_, sanitize_for_log(why, 200), std::max(1, settings_.fleet_size));
        metrics().quota_store_up(false);
    }
    up_ = false;
    reported_ = true;
    connection_.reset();
    next_attempt_ms_ = options_.clock() + backoff_.count();
    backoff_ = std::min(backoff_ * 2, options_.max_backoff);
}

void RedisQuotaStore::came_up() {
    if (!up_) {
        log_info("quota store {} {}: buckets shared by the fleet (fleet_size {})", url_,
                 reported_ ? "reachable again" : "reachable", settings_.fleet_size);
        metrics().quota_store_up(true);
    }
    up_ = true;
    reported_ = true;
    backoff_ = options_.first_backoff;
}

std::optional<QuotaTake> RedisQuotaStore::run(Mode mode, std::string_view route,
                                              std::span<const BucketSpec> buckets,
                                              std::span<const double> amounts,
                                              std::chrono::milliseconds block) {
    std::unique_lock lock(mutex_, std::defer_lock);
    // While Redis is away, one thread at a time tries it again; the others do not wait for
    // its timeout and count on the local share meanwhile.
    // While it is up, the wait for the one connection is bounded too: a slow Redis that
    // still answers must not stall every API message (each command has options_.timeout).
    if (up_.load(std::memory_order_relaxed)) {
        if (!lock.try_lock_for(options_.timeout * 5)) return std::nullopt;
    } else if (!lock.try_lock()) {
        return std::nullopt;
    }
    if (!connection_) {
        if (options_.clock() < next_attempt_ms_) return std::nullopt;
        auto opened = RedisConnection::open(settings_, options_.timeout);
        if (!opened) {
            went_down(opened.error().message);
            return std::nullopt;
        }
        connection_ = std::move(*opened);
    }
    const char* name = mode == Mode::take ? "take" : mode == Mode::drain ? "drain" : "peek";
    auto args = script_arguments(settings_, route, buckets, amounts, name, block);
    auto reply = connection_->script(args, buckets.size() + 1);
    if (!reply) {
        went_down(reply.error().message);
        return std::nullopt;
    }
    auto parsed = parse_script_reply(**reply, buckets, amounts, url_);
    if (!parsed) {
        went_down(parsed.error().message);
        return std::nullopt;
    }
    came_up();
    return std::move(*parsed);
}

QuotaTake RedisQuotaStore::take(std::string_view route, std::span<const BucketSpec> buckets,
                                std::span<const double> amounts) {
    if (auto shared = run(Mode::take, route, buckets, amounts, std::chrono::milliseconds(0))) {
        if (shared->granted) fallback_.debit(route, buckets, amounts);
        return std::move(*shared);
    }
    QuotaTake local = fallback_.take(route, buckets, amounts);
    local.store = fmt::format("{} ({} unreachable)", fallback_.name(), url_);
    local.local_fallback = true;
    return local;
}

void RedisQuotaStore::drain(std::string_view route, std::span<const BucketSpec> buckets,
                            std::chrono::milliseconds block_for) {
    // The whole fleet learns of it through Redis; this gateway's share empties too.
    run(Mode::drain, route, buckets, {}, block_for);
    fallback_.drain(route, buckets, block_for);
}

Result<QuotaTake> peek_shared_quota(const QuotaSettings& settings, std::string_view route,
                                    std::span<const BucketSpec> buckets,
                                    std::chrono::milliseconds timeout) {
    auto connection = RedisConnection::open(settings, timeout);
    if (!connection) return connection.error();
    auto reply = (*connection)
                     ->script(script_arguments(settings, route, buckets, {}, "peek",
                                               std::chrono::milliseconds(0)),
                              buckets.size() + 1);
    if (!reply) return reply.error();
    return parse_script_reply(**reply, buckets, {}, redis_url(settings));
}

}  // namespace paasmilter
