#include <doctest/doctest.h>

#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cctype>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>
#include <nlohmann/json.hpp>

#include "paasmilter/acs_auth.hpp"
#include "paasmilter/c_handle.hpp"
#include "paasmilter/crypto.hpp"
#include "paasmilter/services.hpp"
#include "temp_dir.hpp"
#include "test_support.hpp"

extern char** environ;

using namespace paasmilter;
using namespace std::chrono_literals;
using namespace paasmilter::testing;
using std::chrono::system_clock;

namespace {

// 32 bytes 0x00..0x1f, base64.
constexpr const char* kAccessKey = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
constexpr const char* kSecret = "s3cr+t/&=value~";

// A token endpoint (/tenant-1/oauth2/v2.0/token) whose behaviour GET /control sets (mode,
// expires_in, delay_ms; also resets the counters), GET /stats reports, and /emails... which checks
// an ACS HMAC signature against the Host header and path it actually received.
constexpr const char* kServerScript = R"PY(
import base64, hashlib, hmac, http.server, json, ssl, sys, threading, time, urllib.parse
KEY = base64.b64decode("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=")
lock = threading.Lock()
state = {"mode": "ok", "expires_in": 3600, "delay_ms": 0, "requests": 0, "form": {}}

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args): pass
    def reply(self, status, body):
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    def handle_any(self):
        url = urllib.parse.urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if url.path == "/control":
            with lock:
                for k, v in urllib.parse.parse_qsl(url.query):
                    state[k] = v if k == "mode" else int(v)
                state["requests"] = 0
            self.reply(200, "{}")
        elif url.path == "/stats":
            with lock:
                self.reply(200, json.dumps({"requests": state["requests"], "form": state["form"]}))
        elif url.path == "/tenant-1/oauth2/v2.0/token" and self.command == "POST":
            form = dict(urllib.parse.parse_qsl(body.decode(), keep_blank_values=True))
            with lock:
                state["requests"] += 1
                n, mode, expires, delay = state["requests"], state["mode"], state["expires_in"], state["delay_ms"]
                state["form"] = form
            time.sleep(delay / 1000)
            if self.headers.get("Content-Type") != "application/x-www-form-urlencoded":
                self.reply(415, "{}")
            elif mode == "ok":
                self.reply(200, json.dumps({"token_type": "Bearer", "expires_in": expires, "access_token": "token-%d" % n}))
            elif mode == "string":
                self.reply(200, json.dumps({"token_type": "Bearer", "expires_in": str(expires), "access_token": "token-%d" % n}))
            elif mode == "fail":
                self.reply(401, json.dumps({"error": "invalid_client", "error_codes": [7000215],
                    "error_description": "AADSTS7000215: Invalid client secret provided.\r\nTrace ID: 1f2e\r\nCorrelation ID: 3d4c"}))
            elif mode == "echo":
                self.reply(400, json.dumps({"error": "invalid_request",
                    "error_description": "AADSTS900144: bad value " + form.get("client_secret", "")}))
            elif mode == "notoken":
                self.reply(200, json.dumps({"expires_in": 3600}))
            else:
                self.reply(502, "<html>bad gateway</html>")
        elif url.path.startswith("/emails"):
            content_hash = base64.b64encode(hashlib.sha256(body).digest()).decode()
            to_sign = "\n".join([self.command, self.path, ";".join([self.headers["x-ms-date"] or "", self.headers["Host"], content_hash])])
            signature = base64.b64encode(hmac.new(KEY, to_sign.encode(), hashlib.sha256).digest()).decode()
            expected = "HMAC-SHA256 SignedHeaders=x-ms-date;host;x-ms-content-sha256&Signature=" + signature
            ok = self.headers["x-ms-content-sha256"] == content_hash and self.headers["Authorization"] == expected
            self.reply(202 if ok else 401, json.dumps({"signed": to_sign}))
        else:
            self.reply(404, "{}")
    do_GET = do_POST = handle_any

server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
server.daemon_threads = True
server.handle_error = lambda *args: None
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(sys.argv[1], sys.argv[2])
server.socket = context.wrap_socket(server.socket, server_side=True)
print(server.server_address[1], flush=True)
server.serve_forever()
)PY";

MockHttpsServer& server() {
    static MockHttpsServer instance(kServerScript);
    return instance;
}

std::shared_ptr<HttpClient> client() {
    HttpClientOptions options;
    options.ca_file = server().ca_file();
    return std::make_shared<HttpClient>(options);
}

// Sets the token endpoint's behaviour and resets its request counter.
void control(const std::string& query) {
    HttpRequest request{"GET", server().url("/control?" + query), {}, {}};
    REQUIRE(client()->send(request, 5s).ok());
}

nlohmann::json stats() {
    auto response = client()->send(HttpRequest{"GET", server().url("/stats"), {}, {}}, 5s);
    REQUIRE(response.ok());
    return nlohmann::json::parse(response->body);
}

EntraCredentials secret_credentials() {
    EntraCredentials credentials;
    credentials.authority = server().url("/");
    credentials.tenant_id = "tenant-1";
    credentials.client_id = "client-1";
    credentials.client_secret = kSecret;
    return credentials;
}

// A steady clock the test moves by hand.
struct FakeClock {
    std::chrono::steady_clock::time_point base = std::chrono::steady_clock::now();
    std::atomic<int64_t> seconds{0};
    EntraTokenProvider::Clock function() {
        return [this] { return base + std::chrono::seconds(seconds.load()); };
    }
};

system_clock::time_point at(int64_t unix_seconds) {
    return system_clock::time_point(std::chrono::seconds(unix_seconds));
}

std::string header(const HttpHeaders& headers, const std::string& name) {
    for (const auto& [key, value] : headers)
        if (key == name) return value;
    return {};
}

// An RSA (or other) certificate and its key, made by the openssl CLI; `pem` holds both, as
// the certificate file of EntraCredentials does.
struct AppCertificate {
    TempDir dir;
    std::string cert_file = (dir.path() / "cert.pem").string();
    std::string key_file = (dir.path() / "key.pem").string();
    std::string pem_file = (dir.path() / "app.pem").string();
    std::string pem;
    explicit AppCertificate(const std::string& newkey = "rsa:2048") {
        run("openssl req -x509 -newkey " + newkey + " -nodes -keyout " + key_file + " -out " +
            cert_file + " -subj /CN=paas-milter-app -days 2 2>/dev/null");
        pem = read_all(cert_file) + read_all(key_file);
        dir.write("app.pem", pem);
    }
};

// Independent of crypto.cpp: the certificate as OpenSSL parses it, its DER digests, and JWS
// signature checks with its public key.
using X509Handle = std::unique_ptr<X509, Deleter<X509_free>>;
using BioHandle = std::unique_ptr<BIO, Deleter<BIO_free>>;
using MdCtxHandle = std::unique_ptr<EVP_MD_CTX, Deleter<EVP_MD_CTX_free>>;

X509Handle parse_certificate(const std::string& pem) {
    BioHandle bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
    REQUIRE(bio);
    X509Handle cert(PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr));
    REQUIRE(cert);
    return cert;
}

std::string der_digest(const std::string& cert_pem, const EVP_MD* md) {
    const X509Handle cert = parse_certificate(cert_pem);
    const int length = i2d_X509(cert.get(), nullptr);
    REQUIRE(length > 0);
    std::vector<unsigned char> der(static_cast<size_t>(length));
    unsigned char* end = der.data();
    REQUIRE(i2d_X509(cert.get(), &end) == length);
    unsigned char out[EVP_MAX_MD_SIZE];
    unsigned int out_length = 0;
    REQUIRE(EVP_Digest(der.data(), der.size(), out, &out_length, md, nullptr) == 1);
    return std::string(reinterpret_cast<const char*>(out), out_length);
}

enum class Padding { pkcs1_v1_5, pss_salt_32 };

// EVP_DigestVerify with SHA-256 and the certificate's public key: PKCS#1 v1.5 (RS256), or
// PSS with MGF1-SHA-256 and exactly a 32-byte salt (PS256, RFC 7518 section 3.5).
bool signature_verifies(const std::string& cert_pem, const std::string& input,
                        const std::string& signature, Padding padding) {
    const X509Handle cert = parse_certificate(cert_pem);
    EVP_PKEY* key = X509_get0_pubkey(cert.get());  // owned by cert
    REQUIRE(key != nullptr);
    MdCtxHandle ctx(EVP_MD_CTX_new());
    REQUIRE(ctx);
    EVP_PKEY_CTX* key_ctx = nullptr;  // owned by ctx
    REQUIRE(EVP_DigestVerifyInit(ctx.get(), &key_ctx, EVP_sha256(), nullptr, key) == 1);
    if (padding == Padding::pss_salt_32) {
        REQUIRE(EVP_PKEY_CTX_set_rsa_padding(key_ctx, RSA_PKCS1_PSS_PADDING) == 1);
        REQUIRE(EVP_PKEY_CTX_set_rsa_mgf1_md(key_ctx, EVP_sha256()) == 1);
        REQUIRE(EVP_PKEY_CTX_set_rsa_pss_saltlen(key_ctx, 32) == 1);
    } else {
        REQUIRE(EVP_PKEY_CTX_set_rsa_padding(key_ctx, RSA_PKCS1_PADDING) == 1);
    }
    const int verified = EVP_DigestVerify(
        ctx.get(), reinterpret_cast<const unsigned char*>(signature.data()), signature.size(),
        reinterpret_cast<const unsigned char*>(input.data()), input.size());
    ERR_clear_error();
    return verified == 1;
}

struct DecodedJwt {
    nlohmann::json header;
    nlohmann::json claims;
    std::string signing_input;  // "header.claims" as sent
    std::string signature;      // raw bytes
};

DecodedJwt decode_jwt(const std::string& jwt) {
    const size_t dot1 = jwt.find('.');
    const size_t dot2 = jwt.find('.', dot1 + 1);
    REQUIRE(dot1 != std::string::npos);
    REQUIRE(dot2 != std::string::npos);
    CHECK(jwt.find('.', dot2 + 1) == std::string::npos);
    CHECK(jwt.find('=') == std::string::npos);  // base64url without padding
    auto header = base64url_decode(jwt.substr(0, dot1));
    auto claims = base64url_decode(jwt.substr(dot1 + 1, dot2 - dot1 - 1));
    auto signature = base64url_decode(jwt.substr(dot2 + 1));
    REQUIRE((header.ok() && claims.ok() && signature.ok()));
    return {nlohmann::json::parse(*header), nlohmann::json::parse(*claims), jwt.substr(0, dot2),
            *signature};
}

void check_claims(const nlohmann::json& claims, const std::string& audience,
                  const std::string& client_id, int64_t now) {
    CHECK(claims.size() == 7);
    CHECK(claims["aud"] == audience);
    CHECK(claims["iss"] == client_id);
    CHECK(claims["sub"] == client_id);
    CHECK(claims["nbf"] == now);
    CHECK(claims["iat"] == now);
    CHECK(claims["exp"] == now + 600);
    const std::string jti = claims["jti"];
    CHECK(jti.size() == 36);
    CHECK(jti[14] == '4');  // a random (version 4) UUID
}

}  // namespace

TEST_CASE("parse_connection_string: accepted forms") {
    auto parsed = parse_connection_string(
        "endpoint=https://contoso.communication.azure.com/;accesskey=" + std::string(kAccessKey));
    REQUIRE_MESSAGE(parsed.ok(), parsed.error().message);
    CHECK(parsed->endpoint == "https://contoso.communication.azure.com");
    CHECK(parsed->access_key == kAccessKey);

    parsed =
        parse_connection_string("  AccessKey = " + std::string(kAccessKey) +
                                " ;\n ENDPOINT=HTTPS://contoso.communication.azure.com:8443;; ");
    REQUIRE_MESSAGE(parsed.ok(), parsed.error().message);
    CHECK(parsed->endpoint == "https://contoso.communication.azure.com:8443");
    CHECK(parsed->access_key == kAccessKey);

    parsed = parse_connection_string("endpoint=https://x.communication.azure.com;accesskey=" +
                                     std::string(kAccessKey) + ";other=ignored");
    CHECK(parsed.ok());
}

TEST_CASE("parse_connection_string: errors never contain the key") {
    const std::string key = kAccessKey;
    const std::string bad_key = "c2VjcmV0LWtleQ*";
    const std::string cases[] = {
        "accesskey=" + key,
        "endpoint=https://x.communication.azure.com",
        "endpoint=http://x.communication.azure.com;accesskey=" + key,
        "endpoint=https://x.communication.azure.com/path;accesskey=" + key,
        "endpoint=https://;accesskey=" + key,
        "endpoint=https://x.communication.azure.com;accesskey=" + bad_key,
        "endpoint=https://x.communication.azure.com;accesskey=",
        "endpoint=https://x.communication.azure.com;" + key,  // key pasted without its name
        "endpoint=https://x.communication.azure.com;accesskey=" + key + ";accesskey=" + key,
        "",
    };
    for (const auto& text : cases) {
        INFO(text);
        auto parsed = parse_connection_string(text);
        REQUIRE_FALSE(parsed.ok());
        CHECK(parsed.error().message.find("AAECAwQF") == std::string::npos);
        CHECK(parsed.error().message.find("c2VjcmV0") == std::string::npos);
    }
}

TEST_CASE("rfc1123_date") {
    CHECK(rfc1123_date(at(0)) == "Thu, 01 Jan 1970 00:00:00 GMT");
    CHECK(rfc1123_date(at(1752568200) + 999ms) == "Tue, 15 Jul 2025 08:30:00 GMT");
    CHECK(rfc1123_date(at(1709164800)) == "Thu, 29 Feb 2024 00:00:00 GMT");
}

// Expected values computed independently with Python (as the Azure SDK's HMACCredentialsPolicy
// does it):
//   import base64, hashlib, hmac
//   key = base64.b64encode(bytes(range(32))).decode()
//   date = "Tue, 15 Jul 2025 08:30:00 GMT"
//   body = '{"senderAddress":"noreply@contoso.com"}'
//   content_hash = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
//   sts = ("POST\n/emails:send?api-version=2023-03-31\n" + date + ";"
//          + "contoso.communication.azure.com" + ";" + content_hash)
//   base64.b64encode(hmac.new(base64.b64decode(key), sts.encode(), hashlib.sha256).digest())
//   # and for GET /emails/operations/abc%2F1?api-version=2023-03-31 on host 127.0.0.1:8443,
//   # empty body
TEST_CASE("sign_acs_request matches an independently computed signature") {
    const std::string body = R"({"senderAddress":"noreply@contoso.com"})";
    auto headers = sign_acs_request(
        "POST", "https://contoso.communication.azure.com/emails:send?api-version=2023-03-31", body,
        kAccessKey, at(1752568200));
    REQUIRE_MESSAGE(headers.ok(), headers.error().message);
    REQUIRE(headers->size() == 3);
    CHECK(header(*headers, "x-ms-date") == "Tue, 15 Jul 2025 08:30:00 GMT");
    CHECK(header(*headers, "x-ms-content-sha256") ==
          "v9nEJvld4/pfDTyzNv1pkjn3hCNc1WVm6IUW6iqoj0Y=");
    const std::string expected =
        "HMAC-SHA256 SignedHeaders=x-ms-date;host;x-ms-content-sha256&Signature="
        "Fgwa1IGYQtGZ2/QJS0EC2OHi1ryq98Es6hAbTmQjMXo=";
    CHECK(header(*headers, "Authorization") == expected);

    // A body in pieces is hashed as the bytes it stands for.
    HttpBody pieces = std::string(R"({"senderAddress":)");
    pieces.append(std::make_shared<const std::string>(R"("noreply@contoso.com")")).append("}");
    REQUIRE(pieces.pieces().size() == 3);
    auto from_pieces = sign_acs_request(
        "POST", "https://contoso.communication.azure.com/emails:send?api-version=2023-03-31",
        pieces, kAccessKey, at(1752568200));
    REQUIRE(from_pieces.ok());
    CHECK(header(*from_pieces, "Authorization") == expected);

    // The default port is not part of the host (libcurl leaves it out of Host too); the method
    // is upper-cased.
    auto with_port = sign_acs_request(
        "post", "https://contoso.communication.azure.com:443/emails:send?api-version=2023-03-31",
        body, kAccessKey, at(1752568200));
    REQUIRE(with_port.ok());
    CHECK(header(*with_port, "Authorization") == expected);

    // Another port is; the path stays percent-encoded; the fragment is not sent.
    auto get = sign_acs_request(
        "GET", "https://127.0.0.1:8443/emails/operations/abc%2F1?api-version=2023-03-31#frag", "",
        kAccessKey, at(1752568200));
    REQUIRE(get.ok());
    CHECK(header(*get, "Authorization") ==
          "HMAC-SHA256 SignedHeaders=x-ms-date;host;x-ms-content-sha256&Signature="
          "A+L5KggjbPg1ICOKCJi/VbMOummK5I5NTDDQJVmftEc=");

    auto bad = sign_acs_request("POST", "https://x/emails:send", "", "not*base64", at(0));
    REQUIRE_FALSE(bad.ok());
    CHECK(bad.error().message.find("not*base64") == std::string::npos);
    CHECK_FALSE(sign_acs_request("POST", "ftp://x/", "", kAccessKey, at(0)).ok());
}

TEST_CASE("sign_acs_request: a server checking what it received accepts the signature") {
    auto http = client();
    for (const std::string path : {"/emails:send?api-version=2023-03-31",
                                   "/emails/operations/a%2Fb?api-version=2025-09-01"}) {
        HttpRequest request;
        request.method = path.find("send") != std::string::npos ? "POST" : "GET";
        request.url = server().url(path);
        request.body = request.method == "POST" ? R"({"content":{"subject":"é"}})" : "";
        auto signature = sign_acs_request(request.method, request.url, request.body, kAccessKey,
                                          system_clock::now());
        REQUIRE(signature.ok());
        request.headers = *signature;
        request.headers.emplace_back("Content-Type", "application/json");
        auto response = http->send(request, 5s);
        REQUIRE_MESSAGE(response.ok(), response.error().message);
        INFO(response->body);
        CHECK(response->status == 202);
    }
}

TEST_CASE("make_client_assertion: PS256 with x5t#S256, the default") {
    CHECK(EntraCredentials{}.assertion_algorithm == ClientAssertionAlgorithm::ps256);
    AppCertificate app;
    const std::string audience = "https://login.microsoftonline.com/tenant-1/oauth2/v2.0/token";
    auto assertion = make_client_assertion(app.pem, "client-1", audience, at(1752568200),
                                           ClientAssertionAlgorithm::ps256);
    REQUIRE_MESSAGE(assertion.ok(), assertion.error().message);
    const DecodedJwt jwt = decode_jwt(*assertion);

    CHECK(jwt.header.size() == 3);
    CHECK(jwt.header["alg"] == "PS256");
    CHECK(jwt.header["typ"] == "JWT");
    CHECK_FALSE(jwt.header.contains("x5t"));
    REQUIRE(jwt.header.contains("x5t#S256"));
    const std::string thumbprint = jwt.header["x5t#S256"];
    CHECK(thumbprint.size() == 43);  // 32 bytes, base64url without padding
    CHECK(*base64url_decode(thumbprint) == der_digest(read_all(app.cert_file), EVP_sha256()));
    check_claims(jwt.claims, audience, "client-1", 1752568200);

    // RSASSA-PSS, MGF1-SHA-256, 32-byte salt, with the certificate's public key; not a
    // PKCS#1 v1.5 signature; not valid for other bytes.
    const std::string cert = read_all(app.cert_file);
    CHECK(jwt.signature.size() == 256);
    CHECK(signature_verifies(cert, jwt.signing_input, jwt.signature, Padding::pss_salt_32));
    CHECK_FALSE(signature_verifies(cert, jwt.signing_input, jwt.signature, Padding::pkcs1_v1_5));
    CHECK_FALSE(
        signature_verifies(cert, jwt.signing_input + "x", jwt.signature, Padding::pss_salt_32));

    // PSS is randomized, and each assertion has its own jti.
    auto again = make_client_assertion(app.pem, "client-1", audience, at(1752568200),
                                       ClientAssertionAlgorithm::ps256);
    REQUIRE(again.ok());
    const DecodedJwt second = decode_jwt(*again);
    CHECK(second.claims["jti"] != jwt.claims["jti"]);
    CHECK(second.signature != jwt.signature);
    CHECK(signature_verifies(cert, second.signing_input, second.signature, Padding::pss_salt_32));
}

TEST_CASE("make_client_assertion: RS256 with x5t") {
    AppCertificate app;
    const std::string audience = "https://login.microsoftonline.com/tenant-1/oauth2/v2.0/token";
    auto assertion = make_client_assertion(app.pem, "client-1", audience, at(1752568200),
                                           ClientAssertionAlgorithm::rs256);
    REQUIRE_MESSAGE(assertion.ok(), assertion.error().message);
    const DecodedJwt jwt = decode_jwt(*assertion);

    CHECK(jwt.header.size() == 3);
    CHECK(jwt.header["alg"] == "RS256");
    CHECK(jwt.header["typ"] == "JWT");
    CHECK_FALSE(jwt.header.contains("x5t#S256"));
    const std::string thumbprint = jwt.header["x5t"];
    CHECK(thumbprint.size() == 27);  // 20 bytes
    const std::string cert = read_all(app.cert_file);
    CHECK(*base64url_decode(thumbprint) == der_digest(cert, EVP_sha1()));
    // ... which is also the openssl CLI's SHA-1 fingerprint.
    std::string fingerprint =
        run("openssl x509 -in " + app.cert_file + " -noout -fingerprint -sha1");
    std::string expected_hex;
    for (char c : fingerprint.substr(fingerprint.find('=') + 1))
        if (std::isxdigit(static_cast<unsigned char>(c)))
            expected_hex += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    CHECK(hex_encode(*base64url_decode(thumbprint)) == expected_hex);
    check_claims(jwt.claims, audience, "client-1", 1752568200);

    CHECK(signature_verifies(cert, jwt.signing_input, jwt.signature, Padding::pkcs1_v1_5));
    CHECK_FALSE(signature_verifies(cert, jwt.signing_input, jwt.signature, Padding::pss_salt_32));
    CHECK_FALSE(
        signature_verifies(cert, jwt.signing_input + "x", jwt.signature, Padding::pkcs1_v1_5));
    // Also by the openssl CLI.
    const std::string input_file = app.dir.write("input.txt", jwt.signing_input);
    const std::string signature_file = app.dir.write("signature.bin", jwt.signature);
    const std::string public_key = (app.dir.path() / "public.pem").string();
    run("openssl x509 -in " + app.cert_file + " -pubkey -noout > " + public_key);
    CHECK(run("openssl dgst -sha256 -verify " + public_key + " -signature " + signature_file + " " +
              input_file)
              .find("Verified OK") != std::string::npos);
}

TEST_CASE("client certificates: EC keys, another certificate's key and no key are refused") {
    const std::string audience = "https://login.microsoftonline.com/tenant-1/oauth2/v2.0/token";
    const auto refused = [&](const std::string& pem, const std::string& reason) {
        INFO(reason);
        auto checked = check_client_certificate(pem);
        REQUIRE_FALSE(checked.ok());
        CHECK(checked.error().message.find(reason) != std::string::npos);
        for (auto algorithm : {ClientAssertionAlgorithm::ps256, ClientAssertionAlgorithm::rs256}) {
            auto assertion = make_client_assertion(pem, "client-1", audience, at(0), algorithm);
            REQUIRE_FALSE(assertion.ok());
            CHECK(assertion.error().message == checked.error().message);
            CHECK(assertion.error().message.find("BEGIN") == std::string::npos);
        }
    };
    AppCertificate rsa;
    CHECK(check_client_certificate(rsa.pem).ok());

    // Microsoft documents RSA assertions only (PS256, RS256): no ES256.
    AppCertificate ec("ec -pkeyopt ec_paramgen_curve:prime256v1");
    refused(ec.pem, "the certificate's key is EC, not RSA");
    AppCertificate other;
    refused(read_all(rsa.cert_file) + read_all(other.key_file), "does not belong");
    refused(read_all(rsa.cert_file), "private key");
    refused(read_all(rsa.key_file), "certificate");
    const std::string encrypted = (rsa.dir.path() / "encrypted.pem").string();
    run("openssl pkey -in " + rsa.key_file + " -aes256 -passout pass:hunter2 -out " + encrypted);
    refused(read_all(rsa.cert_file) + read_all(encrypted), "private key");
}

TEST_CASE("client assertion algorithm names") {
    CHECK(to_string(ClientAssertionAlgorithm::ps256) == "PS256");
    CHECK(to_string(ClientAssertionAlgorithm::rs256) == "RS256");
    CHECK(parse_client_assertion_algorithm("PS256") == ClientAssertionAlgorithm::ps256);
    CHECK(parse_client_assertion_algorithm("rs256") == ClientAssertionAlgorithm::rs256);
    CHECK_FALSE(parse_client_assertion_algorithm("ES256").has_value());
    CHECK_FALSE(parse_client_assertion_algorithm("").has_value());
}

TEST_CASE("EntraTokenProvider: one request for many calls, refresh before expiry") {
    control("mode=ok&expires_in=3600&delay_ms=0");
    FakeClock clock;
    EntraTokenProvider provider(secret_credentials(), client(), clock.function());
    for (int i = 0; i < 20; ++i) {
        auto token = provider.token(5s);
        REQUIRE_MESSAGE(token.ok(), token.error().message);
        CHECK(*token == "token-1");
    }
    auto seen = stats();
    CHECK(seen["requests"] == 1);
    const auto& form = seen["form"];
    CHECK(form["grant_type"] == "client_credentials");
    CHECK(form["client_id"] == "client-1");
    CHECK(form["scope"] == "https://communication.azure.com//.default");
    CHECK(form["client_secret"] == kSecret);  // survived form encoding
    CHECK_FALSE(form.contains("client_assertion"));

    clock.seconds = 3600 - 301;  // more than 5 minutes left
    CHECK(*provider.token(5s) == "token-1");
    clock.seconds = 3600 - 299;
    CHECK(*provider.token(5s) == "token-2");
    CHECK(stats()["requests"] == 2);

    // Short-lived tokens refresh with 10% of their lifetime left; expires_in as a string.
    control("mode=string&expires_in=60");
    FakeClock short_clock;
    EntraTokenProvider short_lived(secret_credentials(), client(), short_clock.function());
    CHECK(*short_lived.token(5s) == "token-1");
    short_clock.seconds = 53;
    CHECK(*short_lived.token(5s) == "token-1");
    short_clock.seconds = 55;
    CHECK(*short_lived.token(5s) == "token-2");
}

TEST_CASE("EntraTokenProvider: a failed refresh keeps a still-valid token") {
    control("mode=ok&expires_in=3600");
    FakeClock clock;
    EntraTokenProvider provider(secret_credentials(), client(), clock.function());
    REQUIRE(*provider.token(5s) == "token-1");

    control("mode=fail");
    clock.seconds = 3400;
    auto cached = provider.token(5s);
    REQUIRE(cached.ok());
    CHECK(*cached == "token-1");
    CHECK(stats()["requests"] == 1);
    clock.seconds = 3410;  // within the retry pause: no new request
    CHECK(*provider.token(5s) == "token-1");
    CHECK(stats()["requests"] == 1);

    clock.seconds = 3601;  // expired: the error comes through
    auto expired = provider.token(5s);
    REQUIRE_FALSE(expired.ok());
    CHECK(expired.error().message.find("AADSTS7000215") != std::string::npos);
    CHECK(stats()["requests"] == 2);

    control("mode=ok");
    clock.seconds = 3607;  // past the pause after a failure
    CHECK(*provider.token(5s) == "token-1");
}

TEST_CASE("EntraTokenProvider: error mapping") {
    // A fresh provider per case: a provider repeats its last failure for a few seconds.
    control("mode=fail");
    auto failed = EntraTokenProvider(secret_credentials(), client()).token(5s);
    REQUIRE_FALSE(failed.ok());
    const std::string& message = failed.error().message;
    CHECK(message.find("HTTP 401") != std::string::npos);
    CHECK(message.find("invalid_client") != std::string::npos);
    CHECK(message.find("AADSTS7000215: Invalid client secret provided. Trace ID: 1f2e") !=
          std::string::npos);
    CHECK(message.find('\n') == std::string::npos);
    CHECK(message.find(kSecret) == std::string::npos);

    control("mode=echo");  // even a server quoting the secret back does not leak it
    failed = EntraTokenProvider(secret_credentials(), client()).token(5s);
    REQUIRE_FALSE(failed.ok());
    CHECK(failed.error().message.find("AADSTS900144") != std::string::npos);
    CHECK(failed.error().message.find(kSecret) == std::string::npos);

    control("mode=html");
    failed = EntraTokenProvider(secret_credentials(), client()).token(5s);
    REQUIRE_FALSE(failed.ok());
    CHECK(failed.error().message.find("HTTP 502") != std::string::npos);

    control("mode=notoken");
    failed = EntraTokenProvider(secret_credentials(), client()).token(5s);
    REQUIRE_FALSE(failed.ok());
    CHECK(failed.error().message.find("access_token") != std::string::npos);

    EntraCredentials unreachable = secret_credentials();
    unreachable.authority = "https://127.0.0.1:1";
    failed = EntraTokenProvider(unreachable, client()).token(2s);
    REQUIRE_FALSE(failed.ok());
    CHECK(failed.error().message.find("127.0.0.1:1") != std::string::npos);

    EntraCredentials both = secret_credentials();
    both.certificate_file = "/nonexistent.pem";
    CHECK_FALSE(EntraTokenProvider(both, client()).token(1s).ok());
    EntraCredentials bad_tenant = secret_credentials();
    bad_tenant.tenant_id = "a/../b";
    CHECK_FALSE(EntraTokenProvider(bad_tenant, client()).token(1s).ok());
    EntraCredentials missing_file = secret_credentials();
    missing_file.client_secret.clear();
    missing_file.certificate_file = "/nonexistent/app.pem";
    failed = EntraTokenProvider(missing_file, client()).token(1s);
    REQUIRE_FALSE(failed.ok());
    CHECK(failed.error().to_string().find("/nonexistent/app.pem") != std::string::npos);
}

TEST_CASE("EntraTokenProvider: concurrent callers share one refresh") {
    control("mode=ok&expires_in=3600&delay_ms=300");
    EntraTokenProvider provider(secret_credentials(), client());
    std::vector<std::thread> threads;
    std::atomic<int> got_first{0};
    for (int i = 0; i < 8; ++i) {
        threads.emplace_back([&] {
            if (auto token = provider.token(5s); token.ok() && *token == "token-1") ++got_first;
        });
    }
    for (auto& thread : threads) thread.join();
    CHECK(got_first == 8);
    CHECK(stats()["requests"] == 1);
    control("delay_ms=0");
}

TEST_CASE("EntraTokenProvider: a waiter gives up at its own deadline while a slow fetch runs") {
    control("mode=ok&expires_in=3600&delay_ms=1500");
    EntraTokenProvider provider(secret_credentials(), client());
    std::optional<Result<std::string>> first;
    std::thread fetcher([&] { first.emplace(provider.token(5s)); });
    std::this_thread::sleep_for(300ms);  // the fetch is under way

    const auto started = std::chrono::steady_clock::now();
    auto waited = provider.token(200ms);
    const auto elapsed = std::chrono::steady_clock::now() - started;
    fetcher.join();
    REQUIRE_FALSE(waited.ok());
    CHECK(waited.error().message.find("timed out waiting for the token") != std::string::npos);
    CHECK(elapsed >= 150ms);
    CHECK(elapsed < 900ms);
    REQUIRE(first->ok());
    CHECK(**first == "token-1");
    CHECK(*provider.token(1ms) == "token-1");  // cached now: no wait at all
    CHECK(stats()["requests"] == 1);
    control("delay_ms=0");
}

TEST_CASE("EntraTokenProvider: a refresh in progress holds up nobody while the token is valid") {
    control("mode=ok&expires_in=3600&delay_ms=0");
    FakeClock clock;
    EntraTokenProvider provider(secret_credentials(), client(), clock.function());
    REQUIRE(*provider.token(5s) == "token-1");

    control("delay_ms=1500");
    clock.seconds = 3600 - 299;  // due for a refresh, still valid
    std::optional<Result<std::string>> refreshed;
    std::thread refresher([&] { refreshed.emplace(provider.token(5s)); });
    std::this_thread::sleep_for(300ms);

    const auto started = std::chrono::steady_clock::now();
    auto cached = provider.token(5s);
    provider.invalidate("token-0");  // neither blocks on the HTTP request
    const auto elapsed = std::chrono::steady_clock::now() - started;
    refresher.join();
    REQUIRE(cached.ok());
    CHECK(*cached == "token-1");
    CHECK(elapsed < 600ms);
    REQUIRE(refreshed->ok());
    CHECK(**refreshed == "token-1");  // the counter restarted with delay_ms
    CHECK(stats()["requests"] == 1);
    control("delay_ms=0");
}

TEST_CASE("EntraTokenProvider: a failure is repeated for a few seconds without new requests") {
    control("mode=fail&delay_ms=0");
    FakeClock clock;
    EntraTokenProvider provider(secret_credentials(), client(), clock.function());
    for (int i = 0; i < 3; ++i) {
        auto failed = provider.token(5s);
        REQUIRE_FALSE(failed.ok());
        CHECK(failed.error().message.find("AADSTS7000215") != std::string::npos);
    }
    CHECK(stats()["requests"] == 1);

    // Concurrent callers of a failing fetch share its failure instead of retrying in turn.
    control("mode=fail&delay_ms=300");
    clock.seconds = 6;
    std::vector<std::thread> threads;
    std::atomic<int> failures{0};
    for (int i = 0; i < 8; ++i) {
        threads.emplace_back([&] {
            if (auto token = provider.token(5s);
                !token.ok() && token.error().message.find("AADSTS7000215") != std::string::npos)
                ++failures;
        });
    }
    for (auto& thread : threads) thread.join();
    CHECK(failures == 8);
    CHECK(stats()["requests"] == 1);

    control("mode=ok&delay_ms=0");
    clock.seconds = 8;  // still within the pause
    CHECK_FALSE(provider.token(5s).ok());
    CHECK(stats()["requests"] == 0);
    clock.seconds = 12;
    CHECK(*provider.token(5s) == "token-1");
}

TEST_CASE("EntraTokenProvider: invalidate drops only the token it names") {
    control("mode=ok&expires_in=3600&delay_ms=0");
    FakeClock clock;
    EntraTokenProvider provider(secret_credentials(), client(), clock.function());
    REQUIRE(*provider.token(5s) == "token-1");
    provider.invalidate("some-other-token");
    provider.invalidate("");
    CHECK(*provider.token(5s) == "token-1");
    CHECK(stats()["requests"] == 1);

    provider.invalidate("token-1");  // the API answered 401 with it
    CHECK(*provider.token(5s) == "token-2");
    provider.invalidate("token-1");  // a late 401 for the old token keeps the newer one
    CHECK(*provider.token(5s) == "token-2");
    CHECK(stats()["requests"] == 2);
}

TEST_CASE("EntraTokenProvider: certificate credentials send a client assertion") {
    AppCertificate app;
    const std::string cert = read_all(app.cert_file);
    EntraCredentials credentials = secret_credentials();
    credentials.client_secret.clear();
    credentials.certificate_file = app.pem_file;
    for (auto algorithm :
         {std::optional<ClientAssertionAlgorithm>{}, std::optional{ClientAssertionAlgorithm::rs256},
          std::optional{ClientAssertionAlgorithm::ps256}}) {
        const std::string name(algorithm ? to_string(*algorithm) : "default");
        INFO(name);
        control("mode=ok&expires_in=3600");
        if (algorithm) credentials.assertion_algorithm = *algorithm;
        EntraTokenProvider provider(credentials, client());
        auto token = provider.token(5s);
        REQUIRE_MESSAGE(token.ok(), token.error().message);
        CHECK(*token == "token-1");

        const auto form = stats()["form"];
        CHECK(form["client_assertion_type"] ==
              "urn:ietf:params:oauth:client-assertion-type:jwt-bearer");
        CHECK(form["scope"] == "https://communication.azure.com//.default");
        CHECK_FALSE(form.contains("client_secret"));
        const DecodedJwt jwt = decode_jwt(form["client_assertion"]);
        CHECK(jwt.claims["aud"] == entra_token_url(credentials));
        CHECK(jwt.claims["aud"] == server().url("/tenant-1/oauth2/v2.0/token"));
        if (algorithm == ClientAssertionAlgorithm::rs256) {
            CHECK(jwt.header["alg"] == "RS256");
            CHECK(*base64url_decode(jwt.header["x5t"].get<std::string>()) ==
                  der_digest(cert, EVP_sha1()));
            CHECK(signature_verifies(cert, jwt.signing_input, jwt.signature, Padding::pkcs1_v1_5));
        } else {
            CHECK(jwt.header["alg"] == "PS256");
            CHECK(*base64url_decode(jwt.header["x5t#S256"].get<std::string>()) ==
                  der_digest(cert, EVP_sha256()));
            CHECK(signature_verifies(cert, jwt.signing_input, jwt.signature, Padding::pss_salt_32));
        }
    }

    // An EC certificate: the error names the problem and the file.
    AppCertificate ec("ec -pkeyopt ec_paramgen_curve:prime256v1");
    credentials.certificate_file = ec.pem_file;
    control("mode=ok");
    auto refused = EntraTokenProvider(credentials, client()).token(5s);
    REQUIRE_FALSE(refused.ok());
    CHECK(refused.error().to_string().find(ec.pem_file) != std::string::npos);
    CHECK(refused.error().message.find("EC, not RSA") != std::string::npos);
    CHECK(stats()["requests"] == 0);
}

TEST_CASE("EntraTokenProvider: the scope is sent as given, for any resource") {
    for (const std::string scope :
         {"https://graph.microsoft.com/.default", "https://communication.azure.com//.default",
          "api://11111111-2222-3333-4444-555555555555/.default"}) {
        INFO(scope);
        control("mode=ok&expires_in=3600&delay_ms=0");
        EntraCredentials credentials = secret_credentials();
        credentials.scope = scope;
        auto token = EntraTokenProvider(credentials, client()).token(5s);
        REQUIRE_MESSAGE(token.ok(), token.error().message);
        const auto form = stats()["form"];
        CHECK(form["scope"] == scope);  // decoded by the server: exactly what was configured
        CHECK(form["client_id"] == "client-1");
    }
}

TEST_CASE("services: token caches differ by scope and by assertion algorithm") {
    ServiceRegistry registry;
    HttpClientOptions options;
    EntraCredentials acs = secret_credentials();
    EntraCredentials graph = acs;
    graph.scope = "https://graph.microsoft.com/.default";
    EntraCredentials rs256 = acs;
    rs256.assertion_algorithm = ClientAssertionAlgorithm::rs256;
    const auto shared = registry.token_provider(acs, options);
    CHECK(registry.token_provider(acs, options) == shared);
    CHECK(registry.token_provider(graph, options) != shared);
    CHECK(registry.token_provider(rs256, options) != shared);
}
