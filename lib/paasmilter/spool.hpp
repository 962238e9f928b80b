// The message body of an API-routed message, kept in memory up to a threshold and in an
// unnamed temporary file beyond it, so a 15 MB message does not sit in RAM once per thread.
#pragma once

#include <string>
#include <string_view>

#include "paasmilter/result.hpp"

namespace paasmilter {

class MessageSpool {
  public:
    // Past `max_size` bytes the spool stops storing and reports oversize(): the message is
    // too large for the API whatever its encoding, and the oversize policy applies.
    MessageSpool(size_t memory_threshold, std::string directory, size_t max_size);
    ~MessageSpool();
    MessageSpool(const MessageSpool&) = delete;
    MessageSpool& operator=(const MessageSpool&) = delete;

    Result<void> append(std::string_view data);

    size_t size() const { return size_; }
    bool oversize() const { return oversize_; }
    bool in_memory() const { return fd_ < 0; }
    const std::string& memory() const { return memory_; }
    // The spool file (only when !in_memory()), open read-write; closed by the destructor. It has
    // no name in the directory (unlinked as it is created), so nothing outlives a crash. Read it
    // from offset 0 (convert_message_fd); appends go to its end whatever the offset.
    int fd() const { return fd_; }
    // "/proc/self/fd/N": a path that opens the spool file while the spool lives (Linux).
    const std::string& path() const { return path_; }

  private:
    Result<void> spill_to_file();
    Result<void> write_all(std::string_view data);

    size_t memory_threshold_;
    std::string directory_;
    size_t max_size_;
    size_t size_ = 0;
    bool oversize_ = false;
    std::string memory_;
    std::string path_;
    int fd_ = -1;
};

}  // namespace paasmilter
