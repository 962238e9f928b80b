// The one piece of global mutable state: the configuration in force, swapped atomically on
// SIGHUP. Each message takes its own reference at MAIL FROM and keeps it to the end, so a
// reload never changes the rules under a message in flight.
#pragma once

#include <atomic>
#include <memory>

#include "paasmilter/config.hpp"

namespace paasmilter {

class ConfigSnapshot {
  public:
    std::shared_ptr<const Config> get() const { return current_.load(std::memory_order_acquire); }
    void set(std::shared_ptr<const Config> config) {
        current_.store(std::move(config), std::memory_order_release);
    }

  private:
    std::atomic<std::shared_ptr<const Config>> current_;
};

ConfigSnapshot& config_snapshot();

}  // namespace paasmilter
