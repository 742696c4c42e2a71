// awqc_runner: runs an awqc artifact on a device without Python.
//
// It needs only the artifact directory as `awqc compile` writes it (lib.so, weights.safetensors,
// manifest.json; the tokenizer is not used: prompts are token ids) and the TVM runtime
// (libtvm_runtime.so + libtvm_ffi.so). It drives the model the way awqc/runtime/engine.py does:
// a paged KV cache for one sequence, chunked prefill, then one token per decode step.
//
// It is built against the tvm-ffi headers only: the wheel's tvm/runtime/tensor.h includes
// tvm/support/io.h, which the wheel does not ship. Build it with runtime/cpp/build.py.
//
// Usage:
//   awqc_runner ARTIFACT_DIR --prompt IDS [--feed IDS] [--greedy N] [--logits OUT.bin]
//       IDS are comma-separated token ids. Prefills the prompt, then decodes each --feed id in turn
//       (teacher forcing), then N tokens chosen greedily (argmax; EOS does not stop it). Prints
//       `next: t0 t1 ...`, the argmax after every step; --logits writes the float32 logits of every
//       step (the prompt's last position first) as a raw row-major [steps, vocab] array.
//   awqc_runner --kernel LIB.so FUNCTION ARGS.safetensors OUT.bin
//       Calls FUNCTION(arg0, arg1, ...) of a TVM library with the tensors named arg0, arg1, ... in
//       ARGS.safetensors; the last argument is the output, written raw to OUT.bin (checks kernels
//       against host references).
// Exit status: 0 on success, 1 on an error (message on stderr), 2 on a usage error.

#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace ffi = tvm::ffi;
using ffi::Tensor;

namespace {

constexpr const char* kFormat = "awqc-artifact/1";  // runtime/artifact.py FORMAT
constexpr int64_t kPageSize = 16;                    // runtime/engine.py _PAGE_SIZE
// runtime/artifact.py KNOWN_LAYOUTS: "k8", "i{L}r{R}" and "d{L}" (schedules/layouts.py)
const std::vector<std::string> kKnownLayouts = {
    "k8",   "i4r1",  "i4r2",  "i4r4",  "i4r8",  "i4r16",  "i8r1",  "i8r2",
    "i8r4", "i8r8",  "i8r16", "i16r1", "i16r2", "i16r4",  "i16r8", "i16r16", "d8",   "d16"};

#if defined(__aarch64__)
constexpr const char* kMachine = "aarch64";
#elif defined(__x86_64__)
constexpr const char* kMachine = "x86_64";
#else
constexpr const char* kMachine = "unknown";
#endif

constexpr const char* kUsage =
    "usage: awqc_runner ARTIFACT_DIR --prompt IDS [--feed IDS] [--greedy N] [--logits OUT.bin]\n"
    "       awqc_runner --kernel LIB.so FUNCTION ARGS.safetensors OUT.bin\n"
    "IDS: comma-separated token ids (the runner has no tokenizer).\n";

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// ------------------------------------------------------------------------------------------ JSON
// A small JSON reader, enough for manifest.json and safetensors headers, so the runtime needs no
// JSON library. Numbers keep their text, so 64-bit byte offsets are read exactly.
struct Json {
  enum class Kind { kNull, kBool, kNumber, kString, kArray, kObject };
  Kind kind = Kind::kNull;
  bool boolean = false;
  std::string text;  // a string's value, or a number's literal
  std::vector<Json> items;
  std::vector<std::pair<std::string, Json>> members;

  const Json* Find(const std::string& key) const {
    if (kind != Kind::kObject) return nullptr;
    for (const auto& [k, v] : members)
      if (k == key) return &v;
    return nullptr;
  }
};

class JsonParser {
 public:
  JsonParser(const std::string& text, std::string what) : s_(text), what_(std::move(what)) {}

  Json Parse() {
    Json value = Value(0);
    SkipSpace();
    if (pos_ != s_.size()) Fail("unexpected text after the JSON value");
    return value;
  }

 private:
  static constexpr int kMaxDepth = 64;  // bounds recursion on a damaged file

  [[noreturn]] void Fail(const std::string& msg) const {
    throw std::runtime_error(what_ + " is not valid JSON: " + msg + " at byte " + std::to_string(pos_));
  }
  void SkipSpace() {
    while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\n' || s_[pos_] == '\r' || s_[pos_] == '\t'))
      ++pos_;
  }
  char Peek() {
    SkipSpace();
    if (pos_ >= s_.size()) Fail("unexpected end");
    return s_[pos_];
  }
  void Expect(char c) {
    if (Peek() != c) Fail(std::string("expected '") + c + "'");
    ++pos_;
  }
  bool Literal(const char* word) {
    size_t n = std::strlen(word);
    if (s_.compare(pos_, n, word) != 0) return false;
    pos_ += n;
    return true;
  }

  Json Value(int depth) {
    if (depth > kMaxDepth) Fail("nested too deeply");
    Json v;
    char c = Peek();
    if (c == '{') {
      v.kind = Json::Kind::kObject;
      ++pos_;
      if (Peek() == '}') return ++pos_, v;
      while (true) {
        if (Peek() != '"') Fail("expected a member name");
        std::string key = String();
        Expect(':');
        v.members.emplace_back(std::move(key), Value(depth + 1));
        if (Peek() != ',') break;
        ++pos_;
      }
      Expect('}');
    } else if (c == '[') {
      v.kind = Json::Kind::kArray;
      ++pos_;
      if (Peek() == ']') return ++pos_, v;
      while (true) {
        v.items.push_back(Value(depth + 1));
        if (Peek() != ',') break;
        ++pos_;
      }
      Expect(']');
    } else if (c == '"') {
      v.kind = Json::Kind::kString;
      v.text = String();
    } else if (Literal("true")) {
      v.kind = Json::Kind::kBool;
      v.boolean = true;
    } else if (Literal("false")) {
      v.kind = Json::Kind::kBool;
    } else if (Literal("null")) {
      v.kind = Json::Kind::kNull;
    } else {
      v.kind = Json::Kind::kNumber;
      size_t start = pos_;
      while (pos_ < s_.size() && std::strchr("+-0123456789.eE", s_[pos_]) != nullptr) ++pos_;
      if (pos_ == start) Fail("unexpected character");
      v.text = s_.substr(start, pos_ - start);
    }
    return v;
  }

  unsigned Hex4() {
    if (pos_ + 4 > s_.size()) Fail("short \\u escape");
    unsigned code = 0;
    for (int i = 0; i < 4; ++i) {
      char h = s_[pos_++];
      code <<= 4;
      if (h >= '0' && h <= '9') code |= h - '0';
      else if (h >= 'a' && h <= 'f') code |= h - 'a' + 10;
      else if (h >= 'A' && h <= 'F') code |= h - 'A' + 10;
      else Fail("bad \\u escape");
    }
    return code;
  }

  static void AppendUtf8(std::string* out, unsigned cp) {
    if (cp < 0x80) {
      *out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      *out += static_cast<char>(0xC0 | (cp >> 6));
      *out += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      *out += static_cast<char>(0xE0 | (cp >> 12));
      *out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      *out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      *out += static_cast<char>(0xF0 | (cp >> 18));
      *out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
      *out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      *out += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }

  std::string String() {
    Expect('"');
    std::string out;
    while (true) {
      if (pos_ >= s_.size()) Fail("unterminated string");
      char c = s_[pos_++];
      if (c == '"') return out;
      if (c != '\\') {
        out += c;
        continue;
      }
      if (pos_ >= s_.size()) Fail("unterminated escape");
      char e = s_[pos_++];
      switch (e) {
        case '"': case '\\': case '/': out += e; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          unsigned cp = Hex4();
          if (cp >= 0xD800 && cp < 0xDC00 && s_.compare(pos_, 2, "\\u") == 0) {  // surrogate pair
            pos_ += 2;
            cp = 0x10000 + ((cp - 0xD800) << 10) + (Hex4() - 0xDC00);
          }
          AppendUtf8(&out, cp);
          break;
        }
        default: Fail("bad escape");
      }
    }
  }

  const std::string& s_;
  std::string what_;
  size_t pos_ = 0;
};

// Typed access with errors that name the file and the key.
const Json& Get(const Json& obj, const std::string& key, const std::string& what) {
  const Json* v = obj.Find(key);
  if (v == nullptr) throw std::runtime_error(what + " has no \"" + key + "\"");
  return *v;
}

int64_t AsInt(const Json& v, const std::string& what) {
  if (v.kind != Json::Kind::kNumber || v.text.find_first_of(".eE") != std::string::npos)
    throw std::runtime_error(what + " is not an integer");
  return std::stoll(v.text);
}

const std::string& AsString(const Json& v, const std::string& what) {
  if (v.kind != Json::Kind::kString) throw std::runtime_error(what + " is not a string");
  return v.text;
}

// --------------------------------------------------------------------------------------- files
std::string ReadFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path);
  return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

void WriteFile(const std::string& path, const void* data, size_t nbytes) {
  std::ofstream f(path, std::ios::binary);
  f.write(static_cast<const char*>(data), static_cast<std::streamsize>(nbytes));
  if (!f) throw std::runtime_error("cannot write " + path);
}

// ------------------------------------------------------------------------------------- tensors
// CPU tensors through the pure tvm-ffi API. 64-byte alignment: TVM's generated code assumes it.
struct AlignedCPUAlloc {
  void AllocData(DLTensor* t) {
    size_t n = std::max<size_t>(ffi::GetDataSize(*t), 1);
    t->data = std::aligned_alloc(64, (n + 63) / 64 * 64);
    if (t->data == nullptr) throw std::bad_alloc();
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

Tensor EmptyCPU(const std::vector<int64_t>& shape, DLDataType dtype) {
  return Tensor::FromNDAlloc(AlignedCPUAlloc(), ffi::Shape(shape), dtype, DLDevice{kDLCPU, 0});
}

size_t NumBytes(const Tensor& t) { return ffi::GetDataSize(*t.GetDLTensorPtr()); }

// ---------------------------------------------------------------------------------- safetensors
// A safetensors file: 8-byte little-endian header length, a JSON header
// {name: {"dtype", "shape", "data_offsets": [begin, end]}}, then the raw little-endian data.
class SafeTensors {
 public:
  explicit SafeTensors(const std::string& path) : path_(path), file_(path, std::ios::binary) {
    if (!file_) throw std::runtime_error("cannot open " + path);
    file_.seekg(0, std::ios::end);
    size_ = static_cast<uint64_t>(file_.tellg());
    file_.seekg(0);
    unsigned char len_bytes[8] = {};
    if (!file_.read(reinterpret_cast<char*>(len_bytes), 8)) throw std::runtime_error(path + " is truncated");
    uint64_t header_len = 0;
    for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | len_bytes[i];
    if (header_len > size_ - 8) throw std::runtime_error(path + " is truncated (header)");
    std::string header(header_len, '\0');
    file_.read(header.data(), static_cast<std::streamsize>(header_len));
    header_ = JsonParser(header, path + " header").Parse();
    if (header_.kind != Json::Kind::kObject) throw std::runtime_error(path + " header is not a JSON object");
    data_start_ = 8 + header_len;
  }

  bool Has(const std::string& name) const { return header_.Find(name) != nullptr; }

  // The tensor `name`, read into a new aligned CPU tensor.
  Tensor Load(const std::string& name) {
    const Json* info = header_.Find(name);
    if (info == nullptr) throw std::runtime_error(path_ + " has no tensor \"" + name + "\"");
    std::string what = path_ + " tensor " + name;
    DLDataType dtype = ParseDType(AsString(Get(*info, "dtype", what), what + " dtype"));
    std::vector<int64_t> shape;
    for (const Json& d : Get(*info, "shape", what).items) shape.push_back(AsInt(d, what + " shape"));
    const Json& offsets = Get(*info, "data_offsets", what);
    if (offsets.items.size() != 2) throw std::runtime_error(what + " data_offsets is not [begin, end]");
    uint64_t begin = AsInt(offsets.items[0], what), end = AsInt(offsets.items[1], what);
    Tensor t = EmptyCPU(shape, dtype);
    if (end < begin || end - begin != NumBytes(t))
      throw std::runtime_error(what + ": its byte range does not match its dtype and shape");
    if (data_start_ + end > size_) throw std::runtime_error(path_ + " is truncated at tensor " + name);
    file_.seekg(static_cast<std::streamoff>(data_start_ + begin));
    file_.read(static_cast<char*>(t.data_ptr()), static_cast<std::streamsize>(end - begin));
    if (!file_) throw std::runtime_error("cannot read tensor " + name + " from " + path_);
    return t;
  }

 private:
  static DLDataType ParseDType(const std::string& s) {
    static const std::map<std::string, DLDataType> kTypes = {
        {"F32", {kDLFloat, 32, 1}}, {"F16", {kDLFloat, 16, 1}}, {"BF16", {kDLBfloat, 16, 1}},
        {"I64", {kDLInt, 64, 1}},   {"I32", {kDLInt, 32, 1}},   {"I8", {kDLInt, 8, 1}},
        {"U32", {kDLUInt, 32, 1}},  {"U8", {kDLUInt, 8, 1}}};
    auto it = kTypes.find(s);
    if (it == kTypes.end()) throw std::runtime_error("unsupported safetensors dtype " + s);
    return it->second;
  }

  std::string path_;
  std::ifstream file_;
  uint64_t size_ = 0, data_start_ = 0;
  Json header_;
};

// ------------------------------------------------------------------------------------- artifact
struct Manifest {
  std::vector<std::string> params;  // the order of the library's packed parameter tuple
  int64_t context_window = 0;
  int64_t prefill_chunk = 0;
  int64_t vocab_size = 0;
};

// Reads manifest.json and refuses what this runner cannot run, like runtime/artifact.py does.
// (File hashes are not re-checked here; `awqc` verifies them before copying to a device.)
Manifest ReadManifest(const std::string& dir) {
  const std::string path = dir + "/manifest.json";
  Json m = JsonParser(ReadFile(path), path).Parse();
  const std::string format = AsString(Get(m, "format", path), path + " format");
  if (format != kFormat)
    throw std::runtime_error(path + " has format " + format + "; this runner reads " + kFormat);
  const Json& target = Get(m, "target", path);
  const std::string arch = AsString(Get(target, "arch", path + " target"), path + " target.arch");
  if (arch != kMachine)
    throw std::runtime_error("the artifact was built for " + arch + " but this runner is for " + kMachine +
                             "; compile it with --target matching this device");
#ifdef AWQC_TVM_VERSION
  const std::string tvm = AsString(Get(m, "tvm_version", path), path + " tvm_version");
  if (tvm != AWQC_TVM_VERSION)
    throw std::runtime_error("the artifact was built with TVM " + tvm + " but this runner links TVM " +
                             AWQC_TVM_VERSION + "; rebuild one of them");
#endif
  const Json& quant = Get(m, "quantization", path);
  if (quant.kind != Json::Kind::kNull) {
    const std::string layout = AsString(Get(quant, "layout", path), path + " quantization.layout");
    if (std::find(kKnownLayouts.begin(), kKnownLayouts.end(), layout) == kKnownLayouts.end())
      throw std::runtime_error("the artifact's int4 weights use layout " + layout + ", unknown to this runner");
  }
  Manifest out;
  for (const Json& p : Get(m, "params", path).items) out.params.push_back(AsString(p, path + " params"));
  out.context_window = AsInt(Get(m, "context_window", path), path + " context_window");
  out.prefill_chunk = AsInt(Get(m, "prefill_chunk", path), path + " prefill_chunk");
  out.vocab_size = AsInt(Get(Get(m, "model", path), "vocab_size", path + " model"), path + " vocab_size");
  if (out.params.empty() || out.context_window <= 0 || out.prefill_chunk <= 0)
    throw std::runtime_error(path + " lists no params or a non-positive context window / prefill chunk");
  return out;
}

ffi::Function RequireFunction(const ffi::Module& mod, const std::string& name, const std::string& where) {
  ffi::Optional<ffi::Function> f = mod->GetFunction(name);
  if (!f.has_value()) throw std::runtime_error(where + " has no function " + name);
  return f.value();
}

ffi::Function RequireGlobal(const std::string& name) {
  std::optional<ffi::Function> f = ffi::Function::GetGlobal(name);
  if (!f.has_value()) throw std::runtime_error("the TVM runtime has no global function " + name);
  return *f;
}

// One sequence of one artifact: the Relax VM, its weights and a paged KV cache.
class Model {
 public:
  explicit Model(const std::string& dir)
      : manifest_(ReadManifest(dir)), lib_path_(dir + "/lib.so"), vm_(LoadVM(lib_path_)) {
    prefill_ = RequireFunction(vm_, "prefill", lib_path_);
    decode_ = RequireFunction(vm_, "decode", lib_path_);
    begin_forward_ = RequireGlobal("vm.builtin.kv_state_begin_forward");
    end_forward_ = RequireGlobal("vm.builtin.kv_state_end_forward");

    SafeTensors weights(dir + "/weights.safetensors");
    for (const std::string& name : manifest_.params) params_.push_back(weights.Load(name));

    kv_ = RequireFunction(vm_, "create_tir_paged_kv_cache", lib_path_)(
        ffi::Shape({1}), ffi::Shape({manifest_.context_window}), ffi::Shape({manifest_.prefill_chunk}),
        ffi::Shape({kPageSize}));
    RequireGlobal("vm.builtin.kv_state_add_sequence")(kv_, 0);
  }

  const Manifest& manifest() const { return manifest_; }

  // Appends the prompt in chunks of prefill_chunk; the logits of its last token.
  std::vector<float> Prefill(const std::vector<int32_t>& ids) {
    std::vector<float> logits;
    for (size_t start = 0; start < ids.size(); start += manifest_.prefill_chunk) {
      size_t n = std::min<size_t>(manifest_.prefill_chunk, ids.size() - start);
      logits = Step(prefill_, std::vector<int32_t>(ids.begin() + start, ids.begin() + start + n));
    }
    return logits;
  }

  // Appends one token; its logits.
  std::vector<float> Decode(int32_t id) { return Step(decode_, {id}); }

 private:
  // The Relax VM of the library, on one CPU device with the pooled allocator (2), as
  // relax.VirtualMachine(ex, tvm.cpu()) sets it up.
  static ffi::Module LoadVM(const std::string& lib_path) {
    ffi::Module lib = ffi::Module::LoadFromFile(lib_path);
    auto vm = RequireFunction(lib, "vm_load_executable", lib_path)().cast<ffi::Module>();
    RequireFunction(vm, "vm_initialization", lib_path)(static_cast<int>(kDLCPU), 0, 2);
    return vm;
  }

  std::vector<float> Step(const ffi::Function& fn, const std::vector<int32_t>& ids) {
    const int64_t n = static_cast<int64_t>(ids.size());
    if (length_ + n > manifest_.context_window)
      throw std::runtime_error(std::to_string(length_ + n) + " tokens do not fit the context window of " +
                               std::to_string(manifest_.context_window));
    for (int32_t id : ids)
      if (id < 0 || id >= manifest_.vocab_size)
        throw std::runtime_error("token id " + std::to_string(id) + " is outside the vocabulary [0, " +
                                 std::to_string(manifest_.vocab_size) + ")");
    Tensor input = EmptyCPU({1, n}, DLDataType{kDLInt, 32, 1});
    std::memcpy(input.data_ptr(), ids.data(), n * sizeof(int32_t));

    begin_forward_(kv_, ffi::Shape({0}), ffi::Shape({n}));  // sequence 0 grows by n tokens
    auto result = fn(input, kv_, params_).cast<ffi::Array<ffi::Any>>();
    end_forward_(kv_);
    kv_ = result[1];
    length_ += n;

    // prefill and decode return the logits of the last position, [1, 1, vocab] float32.
    Tensor logits = result[0].cast<Tensor>();
    DLDataType dt = logits.dtype();
    if (dt.code != kDLFloat || dt.bits != 32 || logits.numel() != manifest_.vocab_size)
      throw std::runtime_error("the model returned logits that are not float32 [1, 1, vocab]");
    const float* data = static_cast<const float*>(logits.data_ptr());
    return std::vector<float>(data, data + logits.numel());
  }

  Manifest manifest_;
  std::string lib_path_;
  ffi::Module vm_;
  ffi::Function prefill_, decode_, begin_forward_, end_forward_;
  ffi::Array<Tensor> params_;
  ffi::Any kv_;
  int64_t length_ = 0;
};

int32_t Argmax(const std::vector<float>& v) {
  return static_cast<int32_t>(std::max_element(v.begin(), v.end()) - v.begin());
}

// ------------------------------------------------------------------------------------ commands
std::vector<int32_t> ParseIds(const std::string& text, const std::string& flag) {
  std::vector<int32_t> ids;
  size_t pos = 0;
  while (pos <= text.size()) {
    size_t comma = text.find(',', pos);
    std::string item = text.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
    char* end = nullptr;
    long value = std::strtol(item.c_str(), &end, 10);
    if (item.empty() || *end != '\0' || value < 0 || value > INT32_MAX)
      throw UsageError(flag + " expects comma-separated token ids, got \"" + text + "\"");
    ids.push_back(static_cast<int32_t>(value));
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  return ids;
}

int64_t ParseCount(const std::string& text, const std::string& flag) {
  char* end = nullptr;
  long long value = std::strtoll(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0' || value < 0) throw UsageError(flag + " expects a count >= 0, got \"" + text + "\"");
  return value;
}

double MsSince(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

int RunArtifact(int argc, char** argv) {
  std::string dir = argv[1], logits_path;
  std::vector<int32_t> prompt, feed;
  int64_t greedy = 0;
  for (int i = 2; i < argc; i += 2) {
    std::string flag = argv[i];
    if (i + 1 >= argc) throw UsageError(flag + " needs a value");
    std::string value = argv[i + 1];
    if (flag == "--prompt") prompt = ParseIds(value, flag);
    else if (flag == "--feed") feed = ParseIds(value, flag);
    else if (flag == "--greedy") greedy = ParseCount(value, flag);
    else if (flag == "--logits") logits_path = value;
    else throw UsageError("unknown option " + flag);
  }
  if (prompt.empty()) throw UsageError("--prompt is required");

  auto t0 = std::chrono::steady_clock::now();
  Model model(dir);
  std::fprintf(stderr, "[loaded %s: %zu params, %.0f ms]\n", dir.c_str(), model.manifest().params.size(),
               MsSince(t0));
  std::vector<float> all_logits;
  std::vector<int32_t> next;
  auto record = [&](const std::vector<float>& logits) {
    all_logits.insert(all_logits.end(), logits.begin(), logits.end());
    next.push_back(Argmax(logits));
  };

  t0 = std::chrono::steady_clock::now();
  record(model.Prefill(prompt));
  double prefill_ms = MsSince(t0);
  t0 = std::chrono::steady_clock::now();
  for (int32_t id : feed) record(model.Decode(id));
  for (int64_t i = 0; i < greedy; ++i) record(model.Decode(next.back()));  // EOS does not stop it
  size_t steps = feed.size() + greedy;

  std::printf("next:");
  for (int32_t id : next) std::printf(" %d", id);
  std::printf("\n");
  std::fprintf(stderr, "[prefill %zu tokens: %.1f ms; %zu decode steps: %.1f ms/token]\n", prompt.size(),
               prefill_ms, steps, steps ? MsSince(t0) / steps : 0.0);
  if (!logits_path.empty()) WriteFile(logits_path, all_logits.data(), all_logits.size() * sizeof(float));
  return 0;
}

int RunKernel(int argc, char** argv) {
  if (argc != 6) throw UsageError("--kernel takes LIB.so FUNCTION ARGS.safetensors OUT.bin");
  const std::string lib_path = argv[2], name = argv[3], args_path = argv[4], out_path = argv[5];
  ffi::Function fn = RequireFunction(ffi::Module::LoadFromFile(lib_path), name, lib_path);
  SafeTensors file(args_path);
  std::vector<Tensor> args;
  for (int i = 0; file.Has("arg" + std::to_string(i)); ++i) args.push_back(file.Load("arg" + std::to_string(i)));
  if (args.empty()) throw std::runtime_error(args_path + " has no tensor arg0");
  std::vector<ffi::AnyView> packed(args.begin(), args.end());
  ffi::Any unused;
  fn.CallPacked(packed.data(), static_cast<int32_t>(packed.size()), &unused);
  WriteFile(out_path, args.back().data_ptr(), NumBytes(args.back()));
  std::fprintf(stderr, "[%s(%zu tensors) -> %s]\n", name.c_str(), args.size(), out_path.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    if (argc < 2 || std::string(argv[1]) == "-h" || std::string(argv[1]) == "--help") {
      std::fputs(kUsage, argc < 2 ? stderr : stdout);
      return argc < 2 ? 2 : 0;
    }
    return std::string(argv[1]) == "--kernel" ? RunKernel(argc, argv) : RunArtifact(argc, argv);
  } catch (const UsageError& e) {
    std::fprintf(stderr, "awqc_runner: %s\n%s", e.what(), kUsage);
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "awqc_runner: error: %s\n", e.what());
    return 1;
  }
}
