// xtext (RFC 3461, section 4): "+" followed by two upper-case hex digits stands for one byte.
// Sendmail sends its certificate macros so encoded: {cert_subject} is
// "/O=Contoso+20Ltd/CN=printer-42" for the DN "/O=Contoso Ltd/CN=printer-42" (every byte
// outside "!".."~", and "+", "<", ">", "\"", ")", is written as +XX; tls.c, xtextify()).
#pragma once

#include <string>
#include <string_view>

namespace paasmilter {

// The bytes TEXT stands for. A "+" not followed by two hex digits (upper or lower case) is
// kept as it is: a value that was never encoded comes back unchanged unless it happens to
// hold "+" and two hex digits.
inline std::string decode_xtext(std::string_view text) {
    auto hex = [](char c) -> int {
        if (c >= '0' && c <= '9') return c - '0';
        if (c >= 'A' && c <= 'F') return c - 'A' + 10;
        if (c >= 'a' && c <= 'f') return c - 'a' + 10;
        return -1;
    };
    std::string out;
    out.reserve(text.size());
    for (size_t i = 0; i < text.size(); ++i) {
        if (text[i] == '+' && i + 2 < text.size() && hex(text[i + 1]) >= 0 &&
            hex(text[i + 2]) >= 0) {
            out += static_cast<char>(hex(text[i + 1]) * 16 + hex(text[i + 2]));
            i += 2;
        } else {
            out += text[i];
        }
    }
    return out;
}

}  // namespace paasmilter
