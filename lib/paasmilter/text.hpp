// Small ASCII string helpers shared by the modules that compare header names, domains and
// charsets: mail protocols fold case in ASCII only.
#pragma once

#include <algorithm>
#include <string>
#include <string_view>

namespace paasmilter {

constexpr char ascii_lower(char c) {
    return (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c;
}

// Case-insensitive (ASCII) equality.
inline bool iequals(std::string_view a, std::string_view b) {
    return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin(), [](char x, char y) {
               return ascii_lower(x) == ascii_lower(y);
           });
}

// Whether `text` starts with `prefix`, case-insensitive (ASCII).
inline bool istarts_with(std::string_view text, std::string_view prefix) {
    return text.size() >= prefix.size() && iequals(text.substr(0, prefix.size()), prefix);
}

// `text` with ASCII letters in lower case (other bytes, UTF-8 among them, unchanged).
inline std::string ascii_lowercase(std::string_view text) {
    std::string out(text);
    for (char& c : out) c = ascii_lower(c);
    return out;
}

// "text" in double quotes, for error messages. Appended piecewise: `"\"" + std::string(..)`
// trips GCC 12's false -Wrestrict at -O3 (GCC bug 105329), which -Werror turns into an error.
inline std::string quoted(std::string_view text) {
    std::string out;
    out.reserve(text.size() + 2);
    out += '"';
    out += text;
    out += '"';
    return out;
}

}  // namespace paasmilter
