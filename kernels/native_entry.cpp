// The eager entry point's remembered calls, in C++: a call whose signature (every argument's
// type and value, every tensor's dtype, device, shape and strides) matches a call the Python
// path validated and launched reads only its tensors' pointers, allocates the outputs and
// launches the same compiled Triton kernel with cuLaunchKernel.  Python's remembered path
// spends ~40 us of host time per call on a slow host: the signature, a CUDA tensor allocation
// through Python and Triton's 70-argument launcher.  This does the same in a few microseconds.
//
// What an entry holds is worked out in Python (kernels/native_entry.py) from the launch the
// Python path made; anything this file does not recognise returns None, and the caller takes
// the Python path.  Built at first use by kernels/native_build.py.
#include <Python.h>

#include <ATen/ops/empty.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <dlfcn.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

// The CUDA driver calls we need, declared here (no CUDA headers on CPU machines) and
// resolved from libcuda at the first launch.
using CUresult = int;
using CUcontext = void*;
using CUdevice = int;
using LaunchFn = CUresult (*)(void*, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                              unsigned, void*, void**, void**);
using CtxGetCurrentFn = CUresult (*)(CUcontext*);
using CtxGetDeviceFn = CUresult (*)(CUdevice*);
using ErrorStringFn = CUresult (*)(CUresult, const char**);

struct Driver {
  LaunchFn launch = nullptr;
  CtxGetCurrentFn ctx_current = nullptr;
  CtxGetDeviceFn ctx_device = nullptr;
  ErrorStringFn error_string = nullptr;
  bool tried = false;
};
Driver driver;

bool load_driver() {
  if (driver.tried) return driver.launch != nullptr;
  driver.tried = true;
  void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) return false;
  driver.ctx_current = reinterpret_cast<CtxGetCurrentFn>(dlsym(lib, "cuCtxGetCurrent"));
  driver.ctx_device = reinterpret_cast<CtxGetDeviceFn>(dlsym(lib, "cuCtxGetDevice"));
  driver.error_string = reinterpret_cast<ErrorStringFn>(dlsym(lib, "cuGetErrorString"));
  auto launch = reinterpret_cast<LaunchFn>(dlsym(lib, "cuLaunchKernel"));
  if (!driver.ctx_current || !driver.ctx_device || !driver.error_string) return false;
  driver.launch = launch;
  return launch != nullptr;
}

constexpr int kMaxParams = 120;  // kernel parameters; Triton's launcher appends two scratch
constexpr int kMaxInputs = 48;   // entry-point argument names (+ qkv)

// Module state, set once by init(): the keyword names (interned), the tensor types accepted
// (exactly torch.Tensor and nn.Parameter: a subclass may mean fake or traced tensors), the
// result type (FusedQKV) and torch._C._cuda_getCurrentRawStream.
std::vector<PyObject*> names;
PyObject* tensor_type = nullptr;
PyObject* param_type = nullptr;
PyObject* result_type = nullptr;
PyObject* get_stream = nullptr;

struct PtrFix {  // kernel parameter `param` = input's data pointer + offset
  int param;
  int input;  // 0: qkv, 1 + i: keyword names[i]
  int64_t offset;
  bool aligned;  // was a multiple of 16 when the kernel was picked: must stay one
};

// Python references an entry owns are released when the last holder lets go: a call in
// flight holds its entry, so that Python code run meanwhile (a finalizer during an
// allocation) may clear or replace the table without pulling the entry from under it.
struct Entry {
  Entry() = default;
  Entry(const Entry&) = delete;
  Entry& operator=(const Entry&) = delete;
  ~Entry() {
    if (!Py_IsInitialized()) return;  // at exit, after Python: leave its objects be
    Py_XDECREF(device_index);
    Py_XDECREF(empty);
    Py_XDECREF(state);
    Py_XDECREF(keep);
  }
  uint64_t function = 0;  // CUfunction; 0: a dry entry (tests): no launch, return params
  unsigned grid[3] = {1, 1, 1};
  unsigned block = 0, shared = 0;
  int device = -1;
  PyObject* device_index = nullptr;  // owned, for get_stream
  std::vector<uint64_t> params;      // every parameter's bits; pointers filled per call
  std::vector<PtrFix> fixes;
  std::array<int, 4> out_param{{-1, -1, -1, -1}};
  std::array<bool, 4> out_aligned{{false, false, false, false}};
  std::array<int64_t, 4> out_heads{{-1, -1, -1, -1}};  // -1: the shared empty output
  int64_t t = 0, d = 0;
  at::TensorOptions options;
  std::vector<int> bumps;      // inputs written in place: their version counters go up
  PyObject* empty = nullptr;   // owned: the shared 0-element output
  PyObject* state = nullptr;   // owned: the launch state the entry was built under
  PyObject* keep = nullptr;    // owned: the compiled kernel (keeps its module loaded)
};

struct KeyHash {
  size_t operator()(const std::vector<int64_t>& v) const noexcept {
    uint64_t h = 1469598103934665603ull;
    for (int64_t x : v) h = (h ^ static_cast<uint64_t>(x)) * 1099511628211ull;
    return static_cast<size_t>(h);
  }
};

using Table = std::unordered_map<std::vector<int64_t>, std::shared_ptr<Entry>, KeyHash>;
Table& entries = *new Table;  // never destroyed: its entries hold Python objects
constexpr size_t kMaxEntries = 128;  // api._KNOWN keeps 64 calls
int64_t hits = 0, dry_hits = 0;  // calls answered: launched, dry

enum Tag : int64_t { kNone = 1, kTensor, kFalse, kTrue, kInt, kFloat, kStr };

int name_index(PyObject* name) {
  for (size_t i = 0; i < names.size(); ++i)
    if (names[i] == name) return static_cast<int>(i);
  if (!PyUnicode_Check(name)) return -1;
  for (size_t i = 0; i < names.size(); ++i) {  // an equal string that is not the interned one
    int eq = PyUnicode_Compare(names[i], name);
    if (eq == 0) return static_cast<int>(i);
    if (eq == -1 && PyErr_Occurred()) {
      PyErr_Clear();
      return -1;
    }
  }
  return -1;
}

// Appends `value`'s part of the key; false: a value the key does not cover (a miss).
bool key_of(PyObject* value, std::vector<int64_t>& key, const at::Tensor** tensor) {
  *tensor = nullptr;
  PyObject* type = reinterpret_cast<PyObject*>(Py_TYPE(value));
  if (type == tensor_type || type == param_type) {
    const at::Tensor& t = THPVariable_Unpack(value);
    if (t.layout() != c10::kStrided || t.is_nested()) return false;
    key.push_back(kTensor);
    key.push_back(static_cast<int64_t>(t.scalar_type()));
    key.push_back(static_cast<int64_t>(t.device().type()));
    key.push_back(t.device().index());
    key.push_back(t.dim());
    for (int64_t s : t.sizes()) key.push_back(s);
    for (int64_t s : t.strides()) key.push_back(s);
    *tensor = &t;
    return true;
  }
  if (value == Py_None) {
    key.push_back(kNone);
  } else if (value == Py_False || value == Py_True) {
    key.push_back(value == Py_True ? kTrue : kFalse);
  } else if (PyLong_CheckExact(value)) {
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(value, &overflow);
    if (overflow || (v == -1 && PyErr_Occurred())) {
      PyErr_Clear();
      return false;
    }
    key.push_back(kInt);
    key.push_back(v);
  } else if (PyFloat_CheckExact(value)) {
    double v = PyFloat_AS_DOUBLE(value);
    int64_t bits;
    std::memcpy(&bits, &v, sizeof bits);  // keeps 0.0 and -0.0 apart
    key.push_back(kFloat);
    key.push_back(bits);
  } else if (PyUnicode_CheckExact(value)) {
    Py_ssize_t n = 0;
    const char* s = PyUnicode_AsUTF8AndSize(value, &n);
    if (s == nullptr) {
      PyErr_Clear();
      return false;
    }
    key.push_back(kStr);
    key.push_back(n);
    for (Py_ssize_t i = 0; i < n; i += 8) {
      int64_t chunk = 0;
      std::memcpy(&chunk, s + i, static_cast<size_t>(n - i < 8 ? n - i : 8));
      key.push_back(chunk);
    }
  } else {
    return false;
  }
  return true;
}

// The key of (qkv, kwargs) and the tensors by input index; false: no entry can match.
bool build_key(PyObject* qkv, PyObject* kwargs, std::vector<int64_t>& key,
               std::array<const at::Tensor*, kMaxInputs>& inputs) {
  key.clear();
  inputs.fill(nullptr);
  if (!PyDict_Check(kwargs)) return false;
  if (!key_of(qkv, key, &inputs[0])) return false;
  PyObject *name, *value;
  Py_ssize_t pos = 0;
  while (PyDict_Next(kwargs, &pos, &name, &value)) {
    int i = name_index(name);
    if (i < 0 || i + 1 >= kMaxInputs) return false;
    key.push_back(-(i + 1));  // the name, as a negative number (no tag is negative)
    if (!key_of(value, key, &inputs[i + 1])) return false;
  }
  return true;
}

bool same_state(const Entry& e, PyObject* state) {
  if (e.state == state) return true;
  int eq = PyObject_RichCompareBool(e.state, state, Py_EQ);
  if (eq < 0) PyErr_Clear();
  return eq == 1;
}

// The launch itself; false with a Python error set when the driver refuses.
bool launch(const Entry& e, uint64_t* params, int n) {
  // Triton's launcher appends the global and profile scratch pointers (none: checked when
  // the entry was made); the driver reads only as many parameters as the kernel has
  std::array<void*, kMaxParams + 4> ptrs;
  static uint64_t scratch[4] = {0, 0, 0, 0};
  for (int i = 0; i < n; ++i) ptrs[i] = &params[i];
  for (int i = 0; i < 4; ++i) ptrs[n + i] = &scratch[i];
  PyObject* s = PyObject_CallOneArg(get_stream, e.device_index);
  if (s == nullptr) return false;
  uint64_t stream = PyLong_AsUnsignedLongLong(s);
  Py_DECREF(s);
  if (PyErr_Occurred()) return false;
  CUresult r = driver.launch(reinterpret_cast<void*>(e.function), e.grid[0], e.grid[1],
                             e.grid[2], e.block, 1, 1, e.shared,
                             reinterpret_cast<void*>(stream), ptrs.data(), nullptr);
  if (r != 0) {
    const char* msg = "unknown error";
    driver.error_string(r, &msg);
    PyErr_Format(PyExc_RuntimeError, "fused_qkv native launch: CUDA error %d: %s", r, msg);
    return false;
  }
  return true;
}

PyObject* call(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 3) {
    PyErr_SetString(PyExc_TypeError, "call(qkv, kwargs, state)");
    return nullptr;
  }
  static std::vector<int64_t> key;
  std::array<const at::Tensor*, kMaxInputs> inputs;
  if (result_type == nullptr || !build_key(args[0], args[1], key, inputs)) Py_RETURN_NONE;
  auto it = entries.find(key);
  if (it == entries.end()) Py_RETURN_NONE;
  const std::shared_ptr<Entry> held = it->second;  // `it` may not outlive Python code
  const Entry& e = *held;
  if (!same_state(e, args[2])) Py_RETURN_NONE;
  std::array<uint64_t, kMaxParams> params;
  const int n = static_cast<int>(e.params.size());
  std::copy(e.params.begin(), e.params.end(), params.begin());
  for (const PtrFix& f : e.fixes) {
    const at::Tensor* t = inputs[f.input];
    if (t == nullptr) Py_RETURN_NONE;
    uint64_t p = reinterpret_cast<uint64_t>(t->data_ptr()) + static_cast<uint64_t>(f.offset);
    if (f.aligned && (p & 15)) Py_RETURN_NONE;  // the kernel assumed 16-byte alignment
    params[f.param] = p;
  }
  if (e.function != 0) {  // the kernel lives in the context of the device it was loaded on
    CUcontext ctx = nullptr;
    CUdevice dev = -1;
    if (!load_driver() || driver.ctx_current(&ctx) != 0 || ctx == nullptr ||
        driver.ctx_device(&dev) != 0 || dev != e.device)
      Py_RETURN_NONE;
  }
  std::array<at::Tensor, 4> made;
  for (int j = 0; j < 4; ++j) {
    if (e.out_heads[j] < 0) continue;
    made[j] = at::empty({e.t, e.out_heads[j], e.d}, e.options);
    uint64_t p = reinterpret_cast<uint64_t>(made[j].data_ptr());
    if (e.out_aligned[j] && (p & 15)) Py_RETURN_NONE;  // another allocator: let Python go
    if (e.out_param[j] >= 0) params[e.out_param[j]] = p;
  }
  if (e.function == 0) {
    ++dry_hits;
  } else if (!launch(e, params.data(), n)) {
    return nullptr;
  } else {
    ++hits;
  }
  for (int i : e.bumps) {  // what the dispatcher does for an argument written in place
    c10::TensorImpl* impl = inputs[i]->unsafeGetTensorImpl();
    if (!impl->is_inference()) impl->bump_version();
  }
  PyObject* tuple = PyTuple_New(4);
  if (tuple == nullptr) return nullptr;
  for (int j = 0; j < 4; ++j) {
    PyObject* o = e.out_heads[j] < 0 ? (Py_INCREF(e.empty), e.empty) : THPVariable_Wrap(made[j]);
    if (o == nullptr) {
      Py_DECREF(tuple);
      return nullptr;
    }
    PyTuple_SET_ITEM(tuple, j, o);
  }
  PyObject* wrapped = PyTuple_Pack(1, tuple);  // FusedQKV(*tuple), as namedtuple._make does
  Py_DECREF(tuple);
  if (wrapped == nullptr) return nullptr;
  PyObject* result = PyTuple_Type.tp_new(reinterpret_cast<PyTypeObject*>(result_type), wrapped,
                                         nullptr);
  Py_DECREF(wrapped);
  if (result == nullptr || e.function != 0) return result;
  PyObject* list = PyList_New(n);  // a dry entry: (outputs, the parameters it would pass)
  for (int i = 0; list != nullptr && i < n; ++i) {
    PyObject* v = PyLong_FromUnsignedLongLong(params[i]);
    if (v == nullptr) Py_CLEAR(list);
    else PyList_SET_ITEM(list, i, v);
  }
  if (list == nullptr) {
    Py_DECREF(result);
    return nullptr;
  }
  PyObject* pair = PyTuple_Pack(2, result, list);
  Py_DECREF(result);
  Py_DECREF(list);
  return pair;
  END_HANDLE_TH_ERRORS
}

void clear_entries() {
  Table old;
  old.swap(entries);  // the references go after the table is empty
}

// `bits`: each item's low 64 bits (a parameter's bits may exceed INT64_MAX)
bool as_ints(PyObject* seq, std::vector<int64_t>& out, bool bits = false) {
  PyObject* fast = PySequence_Fast(seq, "expected a sequence of ints");
  if (fast == nullptr) return false;
  Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
  out.resize(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PySequence_Fast_GET_ITEM(fast, i);
    out[i] = bits ? static_cast<int64_t>(PyLong_AsUnsignedLongLongMask(item))
                  : PyLong_AsLongLong(item);
    if (out[i] == -1 && PyErr_Occurred()) {
      Py_DECREF(fast);
      return false;
    }
  }
  Py_DECREF(fast);
  return true;
}

// register(qkv, kwargs, state, function, grid, block, shared, device, params, fixes,
//          out_params, out_heads, out_aligned, t, d, like, bumps, empty, keep) -> bool
// params: each kernel parameter's 64 bits; fixes: flat (param, input, offset, aligned) x N;
// out_params / out_heads / out_aligned: 4 each; like: a tensor with the outputs' dtype and
// device.
PyObject* register_entry(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *qkv, *kwargs, *state, *grid, *params, *fixes, *out_params, *out_heads,
      *out_aligned, *like, *bumps, *empty, *keep;
  unsigned long long function;
  unsigned block, shared;
  int device;
  long long t, d;
  if (!PyArg_ParseTuple(args, "OOOKOIIiOOOOOLLOOOO", &qkv, &kwargs, &state, &function, &grid,
                        &block, &shared, &device, &params, &fixes, &out_params, &out_heads,
                        &out_aligned, &t, &d, &like, &bumps, &empty, &keep))
    return nullptr;
  std::vector<int64_t> key;
  std::array<const at::Tensor*, kMaxInputs> inputs;
  if (result_type == nullptr || !build_key(qkv, kwargs, key, inputs)) Py_RETURN_FALSE;
  auto held = std::make_shared<Entry>();
  Entry& e = *held;
  std::vector<int64_t> g, p, f, op, oh, oa, b;
  if (!as_ints(grid, g) || !as_ints(params, p, true) || !as_ints(fixes, f) ||
      !as_ints(out_params, op) || !as_ints(out_heads, oh) || !as_ints(out_aligned, oa) ||
      !as_ints(bumps, b))
    return nullptr;
  if (g.size() != 3 || p.size() > kMaxParams || f.size() % 4 || op.size() != 4 ||
      oh.size() != 4 || oa.size() != 4 || !THPVariable_Check(like)) {
    PyErr_SetString(PyExc_ValueError, "register: malformed entry");
    return nullptr;
  }
  for (size_t i = 0; i < f.size(); i += 4) {
    if (f[i] < 0 || f[i] >= static_cast<int64_t>(p.size()) || f[i + 1] < 0 ||
        f[i + 1] >= kMaxInputs || inputs[f[i + 1]] == nullptr) {
      PyErr_SetString(PyExc_ValueError, "register: a pointer from no tensor argument");
      return nullptr;
    }
    e.fixes.push_back({static_cast<int>(f[i]), static_cast<int>(f[i + 1]), f[i + 2],
                       f[i + 3] != 0});
  }
  for (int64_t i : b) {
    if (i < 0 || i >= kMaxInputs || inputs[i] == nullptr) {
      PyErr_SetString(PyExc_ValueError, "register: a written input that is no tensor");
      return nullptr;
    }
    e.bumps.push_back(static_cast<int>(i));
  }
  for (int j = 0; j < 4; ++j) {
    if (op[j] >= static_cast<int64_t>(p.size())) {
      PyErr_SetString(PyExc_ValueError, "register: output parameter out of range");
      return nullptr;
    }
    e.out_param[j] = static_cast<int>(op[j]);
    e.out_heads[j] = oh[j];
    e.out_aligned[j] = oa[j] != 0;
  }
  e.function = function;
  for (int i = 0; i < 3; ++i) e.grid[i] = static_cast<unsigned>(g[i]);
  e.block = block;
  e.shared = shared;
  e.device = device;
  e.params.assign(p.begin(), p.end());
  e.t = t;
  e.d = d;
  e.options = THPVariable_Unpack(like).options();
  e.device_index = PyLong_FromLong(device);
  Py_INCREF(empty);
  Py_INCREF(state);
  Py_INCREF(keep);
  e.empty = empty;
  e.state = state;
  e.keep = keep;
  std::shared_ptr<Entry> old;  // released after the table changed
  auto it = entries.find(key);
  if (it == entries.end() && entries.size() >= kMaxEntries) it = entries.begin();
  if (it != entries.end()) {
    old = std::move(it->second);
    entries.erase(it);
  }
  entries.emplace(std::move(key), std::move(held));
  Py_RETURN_TRUE;
  END_HANDLE_TH_ERRORS
}

// init(names, tensor_type, parameter_type, result_type, get_stream)
PyObject* init(PyObject*, PyObject* args) {
  PyObject *seq, *tt, *pt, *rt, *gs;
  if (!PyArg_ParseTuple(args, "OOOOO", &seq, &tt, &pt, &rt, &gs)) return nullptr;
  PyObject* fast = PySequence_Fast(seq, "names must be a sequence of str");
  if (fast == nullptr) return nullptr;
  if (PySequence_Fast_GET_SIZE(fast) + 1 > kMaxInputs) {
    Py_DECREF(fast);
    PyErr_SetString(PyExc_ValueError, "too many names");
    return nullptr;
  }
  clear_entries();
  for (PyObject* n : names) Py_DECREF(n);
  names.clear();
  for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(fast); ++i) {
    PyObject* n = PySequence_Fast_GET_ITEM(fast, i);
    if (!PyUnicode_CheckExact(n)) {
      Py_DECREF(fast);
      PyErr_SetString(PyExc_TypeError, "names must be str");
      return nullptr;
    }
    Py_INCREF(n);
    PyUnicode_InternInPlace(&n);
    names.push_back(n);
  }
  Py_DECREF(fast);
  for (PyObject** slot : {&tensor_type, &param_type, &result_type, &get_stream}) Py_XDECREF(*slot);
  Py_INCREF(tt);
  Py_INCREF(pt);
  Py_INCREF(rt);
  Py_INCREF(gs);
  tensor_type = tt;
  param_type = pt;
  result_type = rt;
  get_stream = gs;
  Py_RETURN_NONE;
}

// forget(qkv, kwargs): drop the entry of this call's key, if any
PyObject* forget(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *qkv, *kwargs;
  if (!PyArg_ParseTuple(args, "OO", &qkv, &kwargs)) return nullptr;
  std::vector<int64_t> key;
  std::array<const at::Tensor*, kMaxInputs> inputs;
  std::shared_ptr<Entry> old;
  if (build_key(qkv, kwargs, key, inputs)) {
    auto it = entries.find(key);
    if (it != entries.end()) {
      old = std::move(it->second);
      entries.erase(it);
    }
  }
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

// holds(qkv, kwargs, state): whether an entry of this key and state is in the table
PyObject* holds(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *qkv, *kwargs, *state;
  if (!PyArg_ParseTuple(args, "OOO", &qkv, &kwargs, &state)) return nullptr;
  std::vector<int64_t> key;
  std::array<const at::Tensor*, kMaxInputs> inputs;
  if (!build_key(qkv, kwargs, key, inputs)) Py_RETURN_FALSE;
  auto it = entries.find(key);
  if (it == entries.end()) Py_RETURN_FALSE;
  const std::shared_ptr<Entry> held = it->second;  // the comparison may run Python code
  return PyBool_FromLong(same_state(*held, state));
  END_HANDLE_TH_ERRORS
}

PyObject* clear(PyObject*, PyObject*) {
  clear_entries();
  Py_RETURN_NONE;
}

PyObject* stats(PyObject*, PyObject*) {
  return Py_BuildValue("{s:n,s:L,s:L}", "entries", static_cast<Py_ssize_t>(entries.size()),
                       "hits", static_cast<long long>(hits), "dry",
                       static_cast<long long>(dry_hits));
}

PyMethodDef methods[] = {
    {"call", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(call)), METH_FASTCALL,
     "call(qkv, kwargs, state) -> FusedQKV, or None: no entry fits; a dry entry (tests) "
     "returns (FusedQKV, [the kernel parameters it would pass])"},
    {"register", register_entry, METH_VARARGS, "remember a launched call (see the source)"},
    {"init", init, METH_VARARGS, "init(names, tensor_type, parameter_type, result_type, "
                                 "get_stream)"},
    {"clear", clear, METH_NOARGS, "forget every entry"},
    {"forget", forget, METH_VARARGS, "forget(qkv, kwargs): the entry of this call, if any"},
    {"holds", holds, METH_VARARGS, "holds(qkv, kwargs, state): an entry for this call"},
    {"stats", stats, METH_NOARGS, "{'entries': n, 'hits': launches, 'dry': dry calls}"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "fused_qkv_native", nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit_fused_qkv_native() { return PyModule_Create(&module); }
