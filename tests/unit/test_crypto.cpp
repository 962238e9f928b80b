#include <doctest/doctest.h>

#include <cctype>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <set>
#include <string>

#include "paasmilter/crypto.hpp"
#include "temp_dir.hpp"
#include "test_support.hpp"

using namespace paasmilter;
using namespace paasmilter::testing;

namespace {

std::string hex(const Result<std::string>& bytes) {
    REQUIRE(bytes.ok());
    return hex_encode(*bytes);
}

// An RSA key and a self-signed certificate made by the openssl CLI, independent of the code
// under test.
struct RsaFixture {
    TempDir dir;
    std::string key_file = (dir.path() / "key.pem").string();
    std::string cert_file = (dir.path() / "cert.pem").string();
    RsaFixture() {
        run("openssl req -x509 -newkey rsa:2048 -nodes -keyout " + key_file + " -out " + cert_file +
            " -subj /CN=paas-milter-test -days 2 2>/dev/null");
    }
};

}  // namespace

TEST_CASE("sha256 and sha1 known answers") {
    CHECK(hex(sha256("abc")) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    CHECK(hex(sha256("")) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    CHECK(hex(sha1("abc")) == "a9993e364706816aba3e25717850c26c9cd0d89d");
}

TEST_CASE("hmac_sha256: RFC 4231 test cases 2 and 6, empty key") {
    CHECK(hex(hmac_sha256("Jefe", "what do ya want for nothing?")) ==
          "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    // Key longer than the block size: hashed first.
    CHECK(hex(hmac_sha256(std::string(131, '\xaa'),
                          "Test Using Larger Than Block-Size Key - Hash Key First")) ==
          "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54");
    // python3: hmac.new(b"", b"", hashlib.sha256).hexdigest()
    CHECK(hex(hmac_sha256("", "")) ==
          "b613679a0814d9ec772f95d778c35fc5ff1697c493715653c6c712144292c5ad");
}

TEST_CASE("base64: RFC 4648 vectors round trip") {
    const std::pair<std::string, std::string> vectors[] = {
        {"", ""},
        {"f", "Zg=="},
        {"fo", "Zm8="},
        {"foo", "Zm9v"},
        {"foob", "Zm9vYg=="},
        {"fooba", "Zm9vYmE="},
        {"foobar", "Zm9vYmFy"},
    };
    for (const auto& [plain, encoded] : vectors) {
        CHECK(base64_encode(plain) == encoded);
        auto decoded = base64_decode(encoded);
        REQUIRE(decoded.ok());
        CHECK(*decoded == plain);
    }
    std::string all_bytes;
    for (int i = 0; i < 256; ++i) all_bytes += static_cast<char>(i);
    CHECK(*base64_decode(base64_encode(all_bytes)) == all_bytes);
    CHECK(*base64url_decode(base64url_encode(all_bytes)) == all_bytes);
}

TEST_CASE("base64: whitespace tolerated, invalid input refused") {
    CHECK(*base64_decode(" Zm9v\r\nYmFy\t") == "foobar");
    CHECK(*base64_decode("Zm9v\nYg==\n") == "foob");
    for (const char* bad :
         {"Zg=", "Zm9v!", "Z===", "=Zg=", "Zg==Zg==", "Zm9vYg=a", "Zm9vY", "Zm9v-_=="}) {
        INFO(bad);
        auto decoded = base64_decode(bad);
        CHECK_FALSE(decoded.ok());
    }
    // The error describes the problem without quoting the (possibly secret) input.
    auto decoded = base64_decode("c2VjcmV0!!!!");
    REQUIRE_FALSE(decoded.ok());
    CHECK(decoded.error().message.find("c2VjcmV0") == std::string::npos);
}

TEST_CASE("base64url: URL-safe alphabet without padding") {
    CHECK(base64_encode("\xfb\xff") == "+/8=");
    CHECK(base64url_encode("\xfb\xff") == "-_8");
    CHECK(base64url_encode("f") == "Zg");
    CHECK(*base64url_decode("-_8") == "\xfb\xff");
    CHECK_FALSE(base64url_decode("+/8").ok());
    CHECK_FALSE(base64url_decode("Zg==").ok());
    CHECK_FALSE(base64url_decode("Z").ok());
}

TEST_CASE("uuid_v5: RFC 4122 name-based UUIDs") {
    const std::string dns = "6ba7b810-9dad-11d1-80b4-00c04fd430c8";
    CHECK(*uuid_v5(dns, "www.example.com") == "2ed6657d-e927-568b-95e1-2665a8aea6a2");
    // python3: uuid.uuid5(uuid.NAMESPACE_DNS, "python.org")
    CHECK(*uuid_v5(dns, "python.org") == "886313e1-3b8a-5372-9b90-0c9aee199e5d");
    CHECK(*uuid_v5("6BA7B810-9DAD-11D1-80B4-00C04FD430C8", "python.org") ==
          "886313e1-3b8a-5372-9b90-0c9aee199e5d");
    CHECK_FALSE(uuid_v5("6ba7b8109dad11d180b400c04fd430c8", "x").ok());
    CHECK_FALSE(uuid_v5("6ba7b810-9dad-11d1-80b4-00c04fd430cg", "x").ok());
    CHECK_FALSE(uuid_v5("6ba7b810-9dad-11d1-80b4-00c04fd430c", "x").ok());
}

TEST_CASE("uuid_v4 and random_bytes") {
    std::set<std::string> seen;
    for (int i = 0; i < 50; ++i) {
        auto id = uuid_v4();
        REQUIRE(id.ok());
        REQUIRE(id->size() == 36);
        CHECK((*id)[14] == '4');
        CHECK(std::string("89ab").find((*id)[19]) != std::string::npos);
        seen.insert(*id);
    }
    CHECK(seen.size() == 50);
    auto a = random_bytes(32);
    auto b = random_bytes(32);
    REQUIRE(a.ok());
    REQUIRE(b.ok());
    CHECK(a->size() == 32);
    CHECK(*a != *b);
    CHECK(random_bytes(0)->empty());
}

TEST_CASE("certificate thumbprint and RS256 agree with the openssl CLI") {
    RsaFixture rsa;
    const std::string cert = read_all(rsa.cert_file);
    const std::string key = read_all(rsa.key_file);

    // "sha1 Fingerprint=AB:CD:..." -> "abcd..."
    std::string fingerprint =
        run("openssl x509 -in " + rsa.cert_file + " -noout -fingerprint -sha1");
    fingerprint = fingerprint.substr(fingerprint.find('=') + 1);
    std::string expected;
    for (char c : fingerprint)
        if (std::isxdigit(static_cast<unsigned char>(c)))
            expected += static_cast<char>(std::tolower(c));
    CHECK(hex(certificate_sha1_thumbprint(cert)) == expected);
    // The key file comes first in a combined PEM: the certificate is still found.
    CHECK(hex(certificate_sha1_thumbprint(key + cert)) == expected);

    // PKCS#1 v1.5 signatures are deterministic: byte-identical to openssl dgst's.
    const std::string data = "header.claims";
    const std::string data_file = rsa.dir.write("data.txt", data);
    const std::string cli_signature =
        run("openssl dgst -sha256 -sign " + rsa.key_file + " " + data_file);
    auto signature = rs256_sign(cert + key, data);
    REQUIRE(signature.ok());
    CHECK(signature->size() == 256);
    CHECK(*signature == cli_signature);
}

TEST_CASE("RS256 refuses missing, encrypted and non-RSA keys without prompting") {
    RsaFixture rsa;
    CHECK_FALSE(rs256_sign(read_all(rsa.cert_file), "x").ok());
    CHECK_FALSE(rs256_sign("not a pem", "x").ok());
    CHECK_FALSE(certificate_sha1_thumbprint(read_all(rsa.key_file)).ok());

    const std::string encrypted = (rsa.dir.path() / "enc.pem").string();
    run("openssl pkey -in " + rsa.key_file + " -aes256 -passout pass:hunter2 -out " + encrypted);
    auto signed_with_encrypted = rs256_sign(read_all(encrypted), "x");
    REQUIRE_FALSE(signed_with_encrypted.ok());
    CHECK(signed_with_encrypted.error().message.find("hunter2") == std::string::npos);

    const std::string ec = (rsa.dir.path() / "ec.pem").string();
    run("openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out " + ec);
    auto signed_with_ec = rs256_sign(read_all(ec), "x");
    REQUIRE_FALSE(signed_with_ec.ok());
    CHECK(signed_with_ec.error().message.find("RSA") != std::string::npos);
}

TEST_CASE("SHA-256 thumbprint and PS256 agree with the openssl CLI") {
    RsaFixture rsa;
    const std::string cert = read_all(rsa.cert_file);
    const std::string key = read_all(rsa.key_file);

    std::string fingerprint =
        run("openssl x509 -in " + rsa.cert_file + " -noout -fingerprint -sha256");
    fingerprint = fingerprint.substr(fingerprint.find('=') + 1);
    std::string expected;
    for (char c : fingerprint)
        if (std::isxdigit(static_cast<unsigned char>(c)))
            expected += static_cast<char>(std::tolower(c));
    CHECK(hex(certificate_sha256_thumbprint(cert)) == expected);
    CHECK(hex(certificate_sha256_thumbprint(key + cert)) == expected);
    CHECK_FALSE(certificate_sha256_thumbprint(key).ok());

    // PSS is randomized: verify with the CLI, requiring MGF1-SHA-256 and a 32-byte salt.
    const std::string data = "header.claims";
    const std::string data_file = rsa.dir.write("data.txt", data);
    const std::string public_key = (rsa.dir.path() / "public.pem").string();
    run("openssl x509 -in " + rsa.cert_file + " -pubkey -noout > " + public_key);
    auto signature = ps256_sign(cert + key, data);
    REQUIRE(signature.ok());
    CHECK(signature->size() == 256);
    CHECK(*ps256_sign(cert + key, data) != *signature);
    const std::string signature_file = rsa.dir.write("signature.bin", *signature);
    const std::string verify =
        "openssl dgst -sha256 -sigopt rsa_padding_mode:pss -sigopt "
        "rsa_pss_saltlen:32 -sigopt rsa_mgf1_md:sha256 -verify " +
        public_key + " -signature " + signature_file + " ";
    CHECK(run(verify + data_file).find("Verified OK") != std::string::npos);
    const std::string other_file = rsa.dir.write("other.txt", "header.claimz");
    CHECK(run(verify + other_file + " 2>/dev/null || true").find("Verified OK") ==
          std::string::npos);

    const std::string ec = (rsa.dir.path() / "ec.pem").string();
    run("openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out " + ec);
    auto signed_with_ec = ps256_sign(read_all(ec), "x");
    REQUIRE_FALSE(signed_with_ec.ok());
    CHECK(signed_with_ec.error().message.find("PS256 needs an RSA private key") !=
          std::string::npos);
    CHECK_FALSE(ps256_sign(cert, "x").ok());
}

TEST_CASE("certificate key type and key match") {
    RsaFixture rsa;
    const std::string cert = read_all(rsa.cert_file);
    const std::string key = read_all(rsa.key_file);
    CHECK(*certificate_key_type(cert) == "RSA");
    CHECK(check_private_key_matches_certificate(cert + key).ok());
    CHECK(check_private_key_matches_certificate(key + cert).ok());

    const std::string ec_key = (rsa.dir.path() / "ec.key").string();
    const std::string ec_cert = (rsa.dir.path() / "ec.pem").string();
    run("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout " +
        ec_key + " -out " + ec_cert + " -subj /CN=ec -days 2 2>/dev/null");
    CHECK(*certificate_key_type(read_all(ec_cert)) == "EC");
    CHECK(check_private_key_matches_certificate(read_all(ec_cert) + read_all(ec_key)).ok());

    auto mismatch = check_private_key_matches_certificate(cert + read_all(ec_key));
    REQUIRE_FALSE(mismatch.ok());
    CHECK(mismatch.error().message.find("does not belong") != std::string::npos);
    RsaFixture other;
    CHECK_FALSE(check_private_key_matches_certificate(cert + read_all(other.key_file)).ok());
    CHECK_FALSE(check_private_key_matches_certificate(cert).ok());
    CHECK_FALSE(check_private_key_matches_certificate(key).ok());
    CHECK_FALSE(certificate_key_type(key).ok());
}
