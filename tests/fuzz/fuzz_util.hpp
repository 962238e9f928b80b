// Shared by the fuzz targets: a scratch directory for the files the parsers read, a reader
// that carves fields out of the input, and an invariant check that crashes loudly.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

#include "temp_dir.hpp"

namespace paasmilter::fuzz {

using testing::TempDir;

inline std::string_view as_text(const std::uint8_t* data, std::size_t size) {
    // libFuzzer may hand over a null pointer with size 0.
    return size == 0 ? std::string_view()
                     : std::string_view(reinterpret_cast<const char*>(data), size);
}

// A broken invariant is a finding: abort so libFuzzer (and the replay test) report it.
inline void check(bool condition, const char* what) {
    if (condition) return;
    std::fprintf(stderr, "fuzz invariant violated: %s\n", what);
    std::abort();
}

// Reads strings that may hold any byte (NULs, newlines, invalid UTF-8) from the input. As in
// libFuzzer's FuzzedDataProvider, a string ends at a backslash followed by any byte other
// than a backslash, and "\\\\" is one literal backslash: a mutation inside one field rarely
// shifts every later field, and seeds stay readable ("192.0.2.7\\|host\\|...").
class InputReader {
  public:
    explicit InputReader(std::string_view input) : rest_(input) {}

    bool empty() const { return rest_.empty(); }

    std::string take_string() {
        std::string out;
        while (!rest_.empty()) {
            const char c = rest_.front();
            rest_.remove_prefix(1);
            if (c == '\\' && !rest_.empty()) {
                const char next = rest_.front();
                rest_.remove_prefix(1);
                if (next != '\\') break;
            }
            out += c;
        }
        return out;
    }

    // 0 once the input is used up.
    std::uint8_t take_byte() {
        if (rest_.empty()) return 0;
        const auto byte = static_cast<std::uint8_t>(rest_.front());
        rest_.remove_prefix(1);
        return byte;
    }

  private:
    std::string_view rest_;
};

}  // namespace paasmilter::fuzz
