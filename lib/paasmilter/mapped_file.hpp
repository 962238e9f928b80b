// A read-only view of a whole file open on a descriptor (a spool file), mapped, unmapped
// when the view goes.
#pragma once

#include <sys/mman.h>

#include <cerrno>
#include <cstring>
#include <string>
#include <string_view>

#include "paasmilter/result.hpp"

namespace paasmilter {

class MappedFile {
  public:
    MappedFile() = default;
    ~MappedFile() {
        if (data_ != MAP_FAILED) ::munmap(data_, size_);
    }
    MappedFile(const MappedFile&) = delete;
    MappedFile& operator=(const MappedFile&) = delete;

    // The first `size` bytes of the file; the descriptor's offset is not used or moved.
    Result<void> map(int fd, size_t size) {
        if (size == 0) return {};
        data_ = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0);
        if (data_ == MAP_FAILED)
            return make_error(std::string("cannot map the message: ") + std::strerror(errno));
        size_ = size;
        return {};
    }
    std::string_view view() const {
        if (data_ == MAP_FAILED) return {};
        return {static_cast<const char*>(data_), size_};
    }

  private:
    void* data_ = MAP_FAILED;
    size_t size_ = 0;
};

}  // namespace paasmilter
