// Cryptographic primitives for request signing and Entra ID client assertions, on OpenSSL 3
// (EVP / EVP_MAC). Byte strings are std::string; every OpenSSL failure is an Error value.
// Nothing here ever puts key material into an error message.
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <string_view>

#include "paasmilter/result.hpp"

namespace paasmilter {

// Raw digests (32 and 20 bytes).
Result<std::string> sha256(std::string_view data);
Result<std::string> sha1(std::string_view data);

// Incremental SHA-256 for data that arrives in pieces (a message body from the MTA).
class Sha256 {
  public:
    Sha256();
    ~Sha256();
    Sha256(Sha256&&) noexcept;
    Sha256& operator=(Sha256&&) noexcept;
    Sha256(const Sha256&) = delete;
    Sha256& operator=(const Sha256&) = delete;

    void update(std::string_view data);
    // The raw 32-byte digest of everything given so far; the object can no longer be updated.
    Result<std::string> finish();

  private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

// Raw HMAC-SHA256 (32 bytes). The key may be any length, including empty.
Result<std::string> hmac_sha256(std::string_view key, std::string_view data);

// RFC 4648 base64 with padding.
std::string base64_encode(std::string_view data);
// Strict: only the standard alphabet, correct padding, length a multiple of 4 once ASCII
// whitespace (tolerated anywhere) is dropped. The error never quotes the input.
Result<std::string> base64_decode(std::string_view text);

// RFC 4648 section 5 (URL-safe alphabet) without padding, as JWT uses it.
std::string base64url_encode(std::string_view data);
Result<std::string> base64url_decode(std::string_view text);

// Lowercase hex of raw bytes.
std::string hex_encode(std::string_view data);

// SHA-1 of the DER encoding of the first certificate in `pem` (20 raw bytes): the x5t
// thumbprint of a JWT header before base64url.
Result<std::string> certificate_sha1_thumbprint(std::string_view pem);

// SHA-256 of the DER encoding of the first certificate in `pem` (32 raw bytes): the x5t#S256
// thumbprint of a JWT header (RFC 7515 section 4.1.8) before base64url.
Result<std::string> certificate_sha256_thumbprint(std::string_view pem);

// The type of the public key in the first certificate in `pem`, as OpenSSL names it: "RSA",
// "RSA-PSS", "EC", "ED25519", ...
Result<std::string> certificate_key_type(std::string_view pem);

// Whether the first private key in `pem` is the one whose public half the first certificate
// in `pem` carries: an Error says which is missing or that they differ.
Result<void> check_private_key_matches_certificate(std::string_view pem);

// RSASSA-PKCS1-v1_5 with SHA-256 (JWS "RS256") over `data`, with the first private key in
// `pem` (other PEM blocks, such as the certificate, are skipped). An encrypted key is an
// error: there is nobody to ask for a passphrase.
Result<std::string> rs256_sign(std::string_view private_key_pem, std::string_view data);

// RSASSA-PSS with SHA-256, MGF1 with SHA-256 and a salt as long as the hash, 32 bytes (JWS
// "PS256", RFC 7518 section 3.5), over `data`, with the first private key in `pem`, as
// rs256_sign finds it. PSS signatures are randomized: two calls give different bytes.
Result<std::string> ps256_sign(std::string_view private_key_pem, std::string_view data);

// RFC 4122 name-based UUID, version 5 (SHA-1): `namespace_uuid` in 8-4-4-4-12 form (any
// case), result in lowercase 8-4-4-4-12.
Result<std::string> uuid_v5(std::string_view namespace_uuid, std::string_view name);

// RFC 4122 random UUID, version 4, lowercase 8-4-4-4-12.
Result<std::string> uuid_v4();

// `count` bytes from OpenSSL's CSPRNG.
Result<std::string> random_bytes(std::size_t count);

}  // namespace paasmilter
