// RAII for C library handles: std::unique_ptr<T, Deleter<free_function>>.
#pragma once

namespace paasmilter {

template <auto Free>
struct Deleter {
    template <class T>
    void operator()(T* p) const noexcept {
        Free(p);
    }
};

}  // namespace paasmilter
