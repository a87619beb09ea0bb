// The codec against cereal: encode and decode of one representative message, a std::vector of
// 10,000 small records, with procpool::encode/decode (serialize.hpp) and with cereal's binary
// archives (Debian's libcereal-dev, header-only; a benchmark-only dependency). One serialize
// member serves both libraries.
//
//   build/bench/bench/codec_bench
//
// Counters: MB_per_s (10^6 bytes of encoded message per second), us_per_message (one whole
// vector of 10,000 records), ns_per_record, wire_bytes (the encoded message's size).
//
// Variants:
//   procpool/encode                  procpool::encode(msg): a new exactly-sized std::vector
//   procpool/encode_reused_buffer    the same frame written into a buffer kept across calls
//                                    (detail::encode_frame_into, what the pool's hot path does)
//   procpool/decode                  procpool::decode<std::vector<Record>>(frame)
//   cereal/encode                    BinaryOutputArchive into a new std::ostringstream, + str()
//   cereal/encode_reused_buffer      BinaryOutputArchive into a streambuf appending to a buffer
//                                    kept across calls (cereal's best case)
//   cereal/decode                    BinaryInputArchive from a streambuf over the bytes (no copy)

#include <benchmark/benchmark.h>

#include <procpool/serialize.hpp>

// cereal is a benchmark-only dependency (cmake/install-deps.sh installs libcereal-dev); without
// it only procpool's side is built.
#if __has_include(<cereal/archives/binary.hpp>)
#define PROCPOOL_BENCH_HAVE_CEREAL 1
#include <cereal/archives/binary.hpp>
#include <cereal/types/string.hpp>
#include <cereal/types/vector.hpp>
#endif

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <sstream>
#include <streambuf>
#include <string>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;

struct Record {
  std::int64_t id = 0;
  double score = 0;
  std::string name;  // 12 characters
  std::string tag;   // 6 characters

  template <class Archive>
  void serialize(Archive& ar) {
    ar(id, score, name, tag);
  }
  bool operator==(const Record&) const = default;
};

constexpr std::size_t records = 10'000;

const std::vector<Record>& message() {
  static const std::vector<Record> msg = [] {
    std::vector<Record> v;
    v.reserve(records);
    char name[32], tag[16];
    for (std::size_t i = 0; i < records; ++i) {
      std::snprintf(name, sizeof name, "user-%07zu", i);
      std::snprintf(tag, sizeof tag, "tag-%02zu", i % 100);
      v.push_back(Record{static_cast<std::int64_t>(i) * 7919, static_cast<double>(i) * 0.25,
                         name, tag});
    }
    return v;
  }();
  return msg;
}

#ifdef PROCPOOL_BENCH_HAVE_CEREAL
// An output streambuf that appends to a std::vector<char> (cereal writes through sputn).
class VectorOutBuf : public std::streambuf {
 public:
  explicit VectorOutBuf(std::vector<char>& out) : out_(out) {}

 protected:
  std::streamsize xsputn(const char* s, std::streamsize n) override {
    out_.insert(out_.end(), s, s + n);
    return n;
  }
  int_type overflow(int_type c) override {
    if (c != traits_type::eof()) out_.push_back(static_cast<char>(c));
    return traits_type::not_eof(c);
  }

 private:
  std::vector<char>& out_;
};

// An input streambuf over bytes that are already in memory (no copy).
class MemoryInBuf : public std::streambuf {
 public:
  MemoryInBuf(const char* p, std::size_t n) {
    char* b = const_cast<char*>(p);
    setg(b, b, b + n);
  }
};

#endif  // PROCPOOL_BENCH_HAVE_CEREAL

void report(benchmark::State& state, double secs, std::size_t wire_bytes) {
  auto iters = static_cast<double>(state.iterations());
  state.counters["MB_per_s"] =
      benchmark::Counter(secs > 0 ? static_cast<double>(wire_bytes) * iters / secs / 1e6 : 0);
  state.counters["us_per_message"] = benchmark::Counter(secs * 1e6 / iters);
  state.counters["ns_per_record"] =
      benchmark::Counter(secs * 1e9 / iters / static_cast<double>(records));
  state.counters["wire_bytes"] = benchmark::Counter(static_cast<double>(wire_bytes));
}

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

void procpool_encode(benchmark::State& state) {
  const auto& msg = message();
  std::size_t size = 0;
  double secs = 0;
  for (auto _ : state) {
    auto t0 = Clock::now();
    std::vector<std::byte> frame = procpool::encode(msg);
    benchmark::DoNotOptimize(frame.data());
    size = frame.size();
    secs += seconds_since(t0);
  }
  report(state, secs, size);
}

void procpool_encode_reused(benchmark::State& state) {
  const auto& msg = message();
  std::vector<std::byte> frame;
  double secs = 0;
  for (auto _ : state) {
    auto t0 = Clock::now();
    std::size_t need = procpool::detail::fingerprint_size + procpool::detail::encoded_payload_size(msg);
    if (frame.size() < need) frame.resize(need);
    std::byte* end = procpool::detail::encode_frame_into(msg, frame.data());
    benchmark::DoNotOptimize(end);
    secs += seconds_since(t0);
  }
  report(state, secs, frame.size());
}

void procpool_decode(benchmark::State& state) {
  const auto& msg = message();
  std::vector<std::byte> frame = procpool::encode(msg);
  double secs = 0;
  for (auto _ : state) {
    auto t0 = Clock::now();
    auto v = procpool::decode<std::vector<Record>>(frame);
    benchmark::DoNotOptimize(v.data());
    secs += seconds_since(t0);
    if (v.size() != records || v.back() != msg.back()) state.SkipWithError("decoded wrong");
  }
  report(state, secs, frame.size());
}

#ifdef PROCPOOL_BENCH_HAVE_CEREAL
void cereal_encode(benchmark::State& state) {
  const auto& msg = message();
  std::size_t size = 0;
  double secs = 0;
  for (auto _ : state) {
    auto t0 = Clock::now();
    std::ostringstream os(std::ios::binary);
    {
      cereal::BinaryOutputArchive ar(os);
      ar(msg);
    }
    std::string bytes = std::move(os).str();
    benchmark::DoNotOptimize(bytes.data());
    size = bytes.size();
    secs += seconds_since(t0);
  }
  report(state, secs, size);
}

void cereal_encode_reused(benchmark::State& state) {
  const auto& msg = message();
  std::vector<char> bytes;
  double secs = 0;
  for (auto _ : state) {
    auto t0 = Clock::now();
    bytes.clear();
    VectorOutBuf buf(bytes);
    std::ostream os(&buf);
    {
      cereal::BinaryOutputArchive ar(os);
      ar(msg);
    }
    benchmark::DoNotOptimize(bytes.data());
    secs += seconds_since(t0);
  }
  report(state, secs, bytes.size());
}

void cereal_decode(benchmark::State& state) {
  const auto& msg = message();
  std::ostringstream os(std::ios::binary);
  {
    cereal::BinaryOutputArchive ar(os);
    ar(msg);
  }
  const std::string bytes = os.str();
  double secs = 0;
  for (auto _ : state) {
    auto t0 = Clock::now();
    MemoryInBuf buf(bytes.data(), bytes.size());
    std::istream is(&buf);
    std::vector<Record> v;
    {
      cereal::BinaryInputArchive ar(is);
      ar(v);
    }
    benchmark::DoNotOptimize(v.data());
    secs += seconds_since(t0);
    if (v.size() != records || v.back() != msg.back()) state.SkipWithError("decoded wrong");
  }
  report(state, secs, bytes.size());
}

#endif  // PROCPOOL_BENCH_HAVE_CEREAL

BENCHMARK(procpool_encode)->Name("codec/procpool/encode")->UseRealTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(procpool_encode_reused)
    ->Name("codec/procpool/encode_reused_buffer")
    ->UseRealTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(procpool_decode)->Name("codec/procpool/decode")->UseRealTime()->Unit(benchmark::kMicrosecond);
#ifdef PROCPOOL_BENCH_HAVE_CEREAL
BENCHMARK(cereal_encode)->Name("codec/cereal/encode")->UseRealTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(cereal_encode_reused)
    ->Name("codec/cereal/encode_reused_buffer")
    ->UseRealTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(cereal_decode)->Name("codec/cereal/decode")->UseRealTime()->Unit(benchmark::kMicrosecond);
#endif  // PROCPOOL_BENCH_HAVE_CEREAL

}  // namespace
