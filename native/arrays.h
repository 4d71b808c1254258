// Checks on numpy arrays handed to the native module (a second line of defence:
// ringtrain's Python code validates first).

#pragma once

#include <pybind11/numpy.h>

#include <stdexcept>
#include <string>

namespace ringtrain {

inline const char* contiguous_data(const pybind11::array& a, const char* what) {
    if (!(a.flags() & pybind11::array::c_style)) {
        throw std::invalid_argument(std::string(what) + " must be C-contiguous");
    }
    return static_cast<const char*>(a.data());
}

inline char* writable_data(pybind11::array& a, const char* what) {
    contiguous_data(a, what);
    if (!a.writeable()) {
        throw std::invalid_argument(std::string(what) + " must be writable");
    }
    return static_cast<char*>(a.mutable_data());
}

}  // namespace ringtrain
