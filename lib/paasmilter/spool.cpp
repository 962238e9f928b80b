#include "paasmilter/spool.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include <fmt/format.h>

namespace paasmilter {

MessageSpool::MessageSpool(size_t memory_threshold, std::string directory, size_t max_size)
    : memory_threshold_(memory_threshold), directory_(std::move(directory)), max_size_(max_size) {}

MessageSpool::~MessageSpool() {
    if (fd_ >= 0) ::close(fd_);
}

Result<void> MessageSpool::append(std::string_view data) {
    if (oversize_) return {};
    if (size_ + data.size() > max_size_) {
        oversize_ = true;
        // Nothing more is needed of an oversize message: free what we held.
        std::string().swap(memory_);
        return {};
    }
    size_ += data.size();
    if (fd_ < 0 && memory_.size() + data.size() <= memory_threshold_) {
        memory_.append(data);
        return {};
    }
    if (fd_ < 0) {
        if (auto r = spill_to_file(); !r) return r;
    }
    return write_all(data);
}

Result<void> MessageSpool::spill_to_file() {
    // A file without a name, so that none is left behind if the process dies: O_TMPFILE (never
    // to be linked: O_EXCL), or where the file system lacks it, a named file unlinked at once.
    // O_APPEND: conversions read through a duplicate of the descriptor, which shares its offset.
    int fd = ::open(directory_.c_str(), O_TMPFILE | O_EXCL | O_RDWR | O_APPEND | O_CLOEXEC, 0600);
    if (fd < 0) {
        std::string pattern = directory_ + "/paas-milter-XXXXXX";
        fd = ::mkostemp(pattern.data(), O_APPEND | O_CLOEXEC);
        if (fd < 0) {
            return make_error(fmt::format("cannot create a spool file in {}: {}", directory_,
                                          std::strerror(errno)));
        }
        if (::unlink(pattern.c_str()) != 0) {
            const int error = errno;
            ::close(fd);
            return make_error(
                fmt::format("cannot unlink spool file {}: {}", pattern, std::strerror(error)));
        }
    }
    fd_ = fd;
    path_ = fmt::format("/proc/self/fd/{}", fd);
    std::string held;
    held.swap(memory_);
    return write_all(held);
}

Result<void> MessageSpool::write_all(std::string_view data) {
    while (!data.empty()) {
        ssize_t written = ::write(fd_, data.data(), data.size());
        if (written < 0) {
            if (errno == EINTR) continue;
            return make_error(fmt::format("cannot write the spool file in {}: {}", directory_,
                                          std::strerror(errno)));
        }
        data.remove_prefix(static_cast<size_t>(written));
    }
    return {};
}

}  // namespace paasmilter
