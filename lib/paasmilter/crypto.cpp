#include "paasmilter/crypto.hpp"
#include "paasmilter/c_handle.hpp"

#include <openssl/bio.h>
#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/params.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>

#include <array>
#include <cctype>
#include <climits>
#include <cstdint>
#include <memory>

namespace paasmilter {
namespace {

using MdCtxPtr = std::unique_ptr<EVP_MD_CTX, Deleter<EVP_MD_CTX_free>>;
using MacPtr = std::unique_ptr<EVP_MAC, Deleter<EVP_MAC_free>>;
using MacCtxPtr = std::unique_ptr<EVP_MAC_CTX, Deleter<EVP_MAC_CTX_free>>;
using PkeyPtr = std::unique_ptr<EVP_PKEY, Deleter<EVP_PKEY_free>>;
using BioPtr = std::unique_ptr<BIO, Deleter<BIO_free>>;
using X509Ptr = std::unique_ptr<X509, Deleter<X509_free>>;

// Drains this thread's OpenSSL error queue (so a stale entry never shows up in a later,
// unrelated error) and names the innermost reason. OpenSSL's reasons never quote key bytes.
Error openssl_error(std::string what) {
    unsigned long last = 0;
    while (unsigned long code = ERR_get_error()) last = code;
    if (last != 0) {
        const char* reason = ERR_reason_error_string(last);
        what += ": ";
        what += reason ? reason : "OpenSSL error " + std::to_string(last);
    }
    return make_error(std::move(what));
}

const unsigned char* bytes(std::string_view s) {
    return reinterpret_cast<const unsigned char*>(s.data());
}

// A read-only memory BIO over `data`; OpenSSL takes an int length.
Result<BioPtr> memory_bio(std::string_view data) {
    if (data.size() > static_cast<size_t>(INT_MAX)) return make_error("PEM data too large");
    BioPtr bio(BIO_new_mem_buf(data.data(), static_cast<int>(data.size())));
    if (!bio) return openssl_error("BIO_new_mem_buf failed");
    return bio;
}

// Refuses to prompt: a daemon has no terminal, and PEM decoding would otherwise ask on it.
int no_passphrase(char*, int, int, void*) {
    return -1;
}

Result<std::string> digest(const EVP_MD* md, std::string_view data, const char* name) {
    MdCtxPtr ctx(EVP_MD_CTX_new());
    std::array<unsigned char, EVP_MAX_MD_SIZE> out{};
    unsigned int length = 0;
    if (!ctx || EVP_DigestInit_ex(ctx.get(), md, nullptr) != 1 ||
        EVP_DigestUpdate(ctx.get(), data.data(), data.size()) != 1 ||
        EVP_DigestFinal_ex(ctx.get(), out.data(), &length) != 1) {
        return openssl_error(std::string(name) + " failed");
    }
    return std::string(reinterpret_cast<const char*>(out.data()), length);
}

constexpr std::string_view kBase64Alphabet =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
constexpr std::string_view kBase64UrlAlphabet =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

std::string encode_with(std::string_view data, std::string_view alphabet, bool pad) {
    std::string out;
    out.reserve((data.size() + 2) / 3 * 4);
    size_t i = 0;
    for (; i + 3 <= data.size(); i += 3) {
        const uint32_t n = (uint32_t(uint8_t(data[i])) << 16) |
                           (uint32_t(uint8_t(data[i + 1])) << 8) | uint8_t(data[i + 2]);
        out += alphabet[(n >> 18) & 63];
        out += alphabet[(n >> 12) & 63];
        out += alphabet[(n >> 6) & 63];
        out += alphabet[n & 63];
    }
    const size_t rest = data.size() - i;
    if (rest > 0) {
        uint32_t n = uint32_t(uint8_t(data[i])) << 16;
        if (rest == 2) n |= uint32_t(uint8_t(data[i + 1])) << 8;
        out += alphabet[(n >> 18) & 63];
        out += alphabet[(n >> 12) & 63];
        if (rest == 2) out += alphabet[(n >> 6) & 63];
        if (pad) out.append(rest == 1 ? 2 : 1, '=');
    }
    return out;
}

int sextet(char c, std::string_view alphabet) {
    const size_t at = alphabet.find(c);
    return at == std::string_view::npos ? -1 : static_cast<int>(at);
}

bool is_space(char c) {
    return c == ' ' || c == '\t' || c == '\r' || c == '\n';
}

// Decodes `text` (whitespace already dropped). With `padded`, the length must be a multiple
// of 4 with at most two '=' at the end; without, '=' is refused and a length of 1 mod 4 is
// impossible.
Result<std::string> decode_with(std::string_view text, std::string_view alphabet, bool padded,
                                const char* what) {
    const auto invalid = [&](const char* why) {
        return make_error(std::string("invalid ") + what + ": " + why);
    };
    size_t data_length = text.size();
    if (padded) {
        if (text.size() % 4 != 0) return invalid("length is not a multiple of 4");
        while (data_length > 0 && text.size() - data_length < 2 && text[data_length - 1] == '=')
            --data_length;
    }
    if (data_length % 4 == 1) return invalid("truncated");
    std::string out;
    out.reserve(data_length * 3 / 4);
    uint32_t accumulator = 0;
    int bits = 0;
    for (size_t i = 0; i < data_length; ++i) {
        const int value = sextet(text[i], alphabet);
        if (value < 0) {
            return invalid(text[i] == '=' ? "padding in the middle"
                                          : "character outside the alphabet");
        }
        accumulator = (accumulator << 6) | static_cast<uint32_t>(value);
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            out += static_cast<char>((accumulator >> bits) & 0xFF);
        }
    }
    return out;
}

std::string without_space(std::string_view text) {
    std::string out;
    out.reserve(text.size());
    for (char c : text)
        if (!is_space(c)) out += c;
    return out;
}

Result<X509Ptr> read_certificate(std::string_view pem) {
    auto bio = memory_bio(pem);
    if (!bio) return bio.error();
    X509Ptr cert(PEM_read_bio_X509(bio->get(), nullptr, no_passphrase, nullptr));
    if (!cert) return openssl_error("no PEM certificate found");
    return cert;
}

Result<std::string> certificate_der(std::string_view pem) {
    auto cert = read_certificate(pem);
    if (!cert) return cert.error();
    const int length = i2d_X509(cert->get(), nullptr);
    if (length <= 0) return openssl_error("certificate DER encoding failed");
    std::string der(static_cast<size_t>(length), '\0');
    auto* out = reinterpret_cast<unsigned char*>(der.data());
    if (i2d_X509(cert->get(), &out) != length)
        return openssl_error("certificate DER encoding failed");
    return der;
}

// The first private key in `pem`, skipping other blocks; never prompts for a passphrase.
Result<PkeyPtr> read_private_key(std::string_view pem) {
    auto bio = memory_bio(pem);
    if (!bio) return bio.error();
    PkeyPtr key(PEM_read_bio_PrivateKey(bio->get(), nullptr, no_passphrase, nullptr));
    if (!key) return openssl_error("no usable PEM private key (missing, invalid or encrypted)");
    return key;
}

enum class RsaPadding { pkcs1_v1_5, pss };

// RS256 or PS256 (RFC 7518 sections 3.3 and 3.5) with the first private key in `pem`.
Result<std::string> rsa_sha256_sign(std::string_view pem, std::string_view data,
                                    RsaPadding padding) {
    const char* name = padding == RsaPadding::pss ? "PS256" : "RS256";
    auto key = read_private_key(pem);
    if (!key) return key.error();
    if (EVP_PKEY_is_a(key->get(), "RSA") != 1)
        return make_error(std::string(name) + " needs an RSA private key");
    MdCtxPtr ctx(EVP_MD_CTX_new());
    // Owned by ctx: freed with it, never by us.
    EVP_PKEY_CTX* key_ctx = nullptr;
    if (!ctx || EVP_DigestSignInit(ctx.get(), &key_ctx, EVP_sha256(), nullptr, key->get()) != 1) {
        return openssl_error(std::string(name) + " signing failed");
    }
    // PS256: MGF1 with the same SHA-256, and a salt as long as the hash (32 bytes), which
    // RFC 7518 section 3.5 requires.
    if (padding == RsaPadding::pss &&
        (EVP_PKEY_CTX_set_rsa_padding(key_ctx, RSA_PKCS1_PSS_PADDING) != 1 ||
         EVP_PKEY_CTX_set_rsa_mgf1_md(key_ctx, EVP_sha256()) != 1 ||
         EVP_PKEY_CTX_set_rsa_pss_saltlen(key_ctx, RSA_PSS_SALTLEN_DIGEST) != 1)) {
        return openssl_error("PS256 signing failed");
    }
    size_t length = 0;
    if (EVP_DigestSign(ctx.get(), nullptr, &length, bytes(data), data.size()) != 1)
        return openssl_error(std::string(name) + " signing failed");
    std::string signature(length, '\0');
    if (EVP_DigestSign(ctx.get(), reinterpret_cast<unsigned char*>(signature.data()), &length,
                       bytes(data), data.size()) != 1) {
        return openssl_error(std::string(name) + " signing failed");
    }
    signature.resize(length);
    return signature;
}

std::string format_uuid(const std::array<unsigned char, 16>& b) {
    const std::string hex =
        hex_encode(std::string_view(reinterpret_cast<const char*>(b.data()), 16));
    return hex.substr(0, 8) + "-" + hex.substr(8, 4) + "-" + hex.substr(12, 4) + "-" +
           hex.substr(16, 4) + "-" + hex.substr(20, 12);
}

}  // namespace

Result<std::string> sha256(std::string_view data) {
    return digest(EVP_sha256(), data, "SHA-256");
}

struct Sha256::Impl {
    MdCtxPtr ctx{EVP_MD_CTX_new()};
    bool failed = false;
    bool finished = false;
};

Sha256::Sha256() : impl_(std::make_unique<Impl>()) {
    if (!impl_->ctx || EVP_DigestInit_ex(impl_->ctx.get(), EVP_sha256(), nullptr) != 1) {
        impl_->failed = true;
    }
}
Sha256::~Sha256() = default;
Sha256::Sha256(Sha256&&) noexcept = default;
Sha256& Sha256::operator=(Sha256&&) noexcept = default;

void Sha256::update(std::string_view data) {
    if (impl_->failed || impl_->finished) {
        impl_->failed = true;
        return;
    }
    if (EVP_DigestUpdate(impl_->ctx.get(), data.data(), data.size()) != 1) impl_->failed = true;
}

Result<std::string> Sha256::finish() {
    std::array<unsigned char, EVP_MAX_MD_SIZE> out{};
    unsigned int length = 0;
    if (impl_->failed || impl_->finished ||
        EVP_DigestFinal_ex(impl_->ctx.get(), out.data(), &length) != 1) {
        impl_->failed = true;
        return openssl_error("SHA-256 failed");
    }
    impl_->finished = true;
    return std::string(reinterpret_cast<const char*>(out.data()), length);
}

Result<std::string> sha1(std::string_view data) {
    return digest(EVP_sha1(), data, "SHA-1");
}

Result<std::string> hmac_sha256(std::string_view key, std::string_view data) {
    MacPtr mac(EVP_MAC_fetch(nullptr, OSSL_MAC_NAME_HMAC, nullptr));
    if (!mac) return openssl_error("HMAC unavailable");
    MacCtxPtr ctx(EVP_MAC_CTX_new(mac.get()));
    if (!ctx) return openssl_error("HMAC context allocation failed");
    char digest_name[] = "SHA256";
    const OSSL_PARAM params[] = {
        OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, digest_name, 0),
        OSSL_PARAM_construct_end()};
    // A null key pointer would mean "keep the previous key"; an empty key must still be set.
    static const unsigned char empty = 0;
    const unsigned char* key_bytes = key.empty() ? &empty : bytes(key);
    std::array<unsigned char, EVP_MAX_MD_SIZE> out{};
    size_t length = 0;
    if (EVP_MAC_init(ctx.get(), key_bytes, key.size(), params) != 1 ||
        EVP_MAC_update(ctx.get(), bytes(data), data.size()) != 1 ||
        EVP_MAC_final(ctx.get(), out.data(), &length, out.size()) != 1) {
        return openssl_error("HMAC-SHA256 failed");
    }
    return std::string(reinterpret_cast<const char*>(out.data()), length);
}

std::string base64_encode(std::string_view data) {
    return encode_with(data, kBase64Alphabet, true);
}

Result<std::string> base64_decode(std::string_view text) {
    return decode_with(without_space(text), kBase64Alphabet, true, "base64");
}

std::string base64url_encode(std::string_view data) {
    return encode_with(data, kBase64UrlAlphabet, false);
}

Result<std::string> base64url_decode(std::string_view text) {
    return decode_with(without_space(text), kBase64UrlAlphabet, false, "base64url");
}

std::string hex_encode(std::string_view data) {
    static constexpr char kDigits[] = "0123456789abcdef";
    std::string out;
    out.reserve(data.size() * 2);
    for (unsigned char c : data) {
        out += kDigits[c >> 4];
        out += kDigits[c & 15];
    }
    return out;
}

Result<std::string> certificate_sha1_thumbprint(std::string_view pem) {
    auto der = certificate_der(pem);
    if (!der) return der.error();
    return sha1(*der);
}

Result<std::string> certificate_sha256_thumbprint(std::string_view pem) {
    auto der = certificate_der(pem);
    if (!der) return der.error();
    return sha256(*der);
}

Result<std::string> certificate_key_type(std::string_view pem) {
    auto cert = read_certificate(pem);
    if (!cert) return cert.error();
    // get0: the certificate keeps ownership of its public key.
    const EVP_PKEY* key = X509_get0_pubkey(cert->get());
    if (!key) return openssl_error("the certificate's public key cannot be decoded");
    const char* name = EVP_PKEY_get0_type_name(key);
    if (!name) return make_error("the certificate's public key is of an unknown type");
    return std::string(name);
}

Result<void> check_private_key_matches_certificate(std::string_view pem) {
    auto cert = read_certificate(pem);
    if (!cert) return cert.error();
    auto key = read_private_key(pem);
    if (!key) return key.error();
    const EVP_PKEY* public_key = X509_get0_pubkey(cert->get());
    if (!public_key) return openssl_error("the certificate's public key cannot be decoded");
    const int same = EVP_PKEY_eq(public_key, key->get());
    ERR_clear_error();  // a mismatch of key types leaves an entry behind
    if (same != 1) return make_error("the private key does not belong to the certificate");
    return {};
}

Result<std::string> rs256_sign(std::string_view private_key_pem, std::string_view data) {
    return rsa_sha256_sign(private_key_pem, data, RsaPadding::pkcs1_v1_5);
}

Result<std::string> ps256_sign(std::string_view private_key_pem, std::string_view data) {
    return rsa_sha256_sign(private_key_pem, data, RsaPadding::pss);
}

Result<std::string> uuid_v5(std::string_view namespace_uuid, std::string_view name) {
    std::string hex;
    for (size_t i = 0; i < namespace_uuid.size(); ++i) {
        const char c = namespace_uuid[i];
        if ((i == 8 || i == 13 || i == 18 || i == 23) && c == '-') continue;
        if (!std::isxdigit(static_cast<unsigned char>(c))) break;
        hex += c;
    }
    if (namespace_uuid.size() != 36 || hex.size() != 32) {
        return make_error("invalid namespace UUID (expected 8-4-4-4-12 hex digits)");
    }
    std::string input;
    for (size_t i = 0; i < 32; i += 2) {
        input += static_cast<char>(std::stoi(hex.substr(i, 2), nullptr, 16));
    }
    input.append(name);
    auto hash = sha1(input);
    if (!hash) return hash.error();
    std::array<unsigned char, 16> b{};
    for (size_t i = 0; i < 16; ++i) b[i] = static_cast<unsigned char>((*hash)[i]);
    b[6] = static_cast<unsigned char>((b[6] & 0x0F) | 0x50);  // version 5
    b[8] = static_cast<unsigned char>((b[8] & 0x3F) | 0x80);  // RFC 4122 variant
    return format_uuid(b);
}

Result<std::string> uuid_v4() {
    auto random = random_bytes(16);
    if (!random) return random.error();
    std::array<unsigned char, 16> b{};
    for (size_t i = 0; i < 16; ++i) b[i] = static_cast<unsigned char>((*random)[i]);
    b[6] = static_cast<unsigned char>((b[6] & 0x0F) | 0x40);  // version 4
    b[8] = static_cast<unsigned char>((b[8] & 0x3F) | 0x80);
    return format_uuid(b);
}

Result<std::string> random_bytes(std::size_t count) {
    if (count > static_cast<size_t>(INT_MAX)) return make_error("too many random bytes requested");
    std::string out(count, '\0');
    if (count > 0 &&
        RAND_bytes(reinterpret_cast<unsigned char*>(out.data()), static_cast<int>(count)) != 1) {
        return openssl_error("random number generator failed");
    }
    return out;
}

}  // namespace paasmilter
