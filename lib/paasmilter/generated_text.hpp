// Text helpers shared by the configuration generators (postfix_config.cpp,
// sendmail_config.cpp): comment blocks and table paths.
#pragma once

#include <string>
#include <string_view>

namespace paasmilter {

// `text` as comment lines starting with `marker` ("#", "dnl"), words wrapped at about 90
// columns; no newline after the last line.
inline std::string wrapped_comment(std::string_view marker, std::string_view text) {
    std::string out;
    std::string line(marker);
    size_t start = 0;
    while (start < text.size()) {
        size_t end = text.find(' ', start);
        if (end == std::string_view::npos) end = text.size();
        const std::string_view word = text.substr(start, end - start);
        if (line.size() > marker.size() && line.size() + 1 + word.size() > 90) {
            out += line;
            out += '\n';
            // resize, not assignment: assigning trips a false GCC 12 -Wrestrict at -O3
            line.resize(marker.size());
        }
        line += ' ';
        line += word;
        start = end + 1;
    }
    return out + line;
}

// DIRECTORY/FILE, without doubled slashes.
inline std::string join_path(std::string_view directory, std::string_view file) {
    std::string out(directory);
    while (out.size() > 1 && out.back() == '/') out.pop_back();
    if (out != "/") out += '/';
    return out + std::string(file);
}

}  // namespace paasmilter
