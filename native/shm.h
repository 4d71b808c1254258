// Shared-memory allreduce among the ranks of one host (shm.cpp).

#pragma once

#include <pybind11/pybind11.h>

namespace ringtrain {

// Adds class ShmGroup and exception PeerLost to the module.
void register_shm(pybind11::module_& m);

}  // namespace ringtrain
