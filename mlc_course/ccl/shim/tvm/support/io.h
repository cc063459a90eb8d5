/*
 * Minimal stand-in for <tvm/support/io.h>, which tvm/runtime/tensor.h includes but the
 * apache-tvm 0.27 wheel does not ship.  Only what tensor.h's inline (de)serialisers need to
 * *compile* is declared here; a CCL plugin never serialises tensors, so none of it runs.
 * Written for mlc_course (not copied from TVM).
 */
#ifndef MLC_COURSE_SHIM_TVM_SUPPORT_IO_H_
#define MLC_COURSE_SHIM_TVM_SUPPORT_IO_H_

#include <tvm/ffi/endian.h>  // TVM_FFI_IO_NO_ENDIAN_SWAP, ffi::ByteSwap

#include <cstddef>
#include <cstdint>

namespace tvm {
namespace support {

/*! \brief Byte stream interface with typed helpers for trivially copyable values. */
class Stream {
 public:
  virtual ~Stream() = default;
  virtual size_t Read(void* ptr, size_t size) = 0;
  virtual size_t Write(const void* ptr, size_t size) = 0;

  template <typename T>
  void Write(const T& value) {
    this->Write(static_cast<const void*>(&value), sizeof(T));
  }
  template <typename T>
  bool Read(T* out) {
    return this->Read(static_cast<void*>(out), sizeof(T)) == sizeof(T);
  }
  template <typename T>
  void WriteArray(const T* data, size_t n) {
    this->Write(static_cast<const void*>(data), sizeof(T) * n);
  }
  template <typename T>
  bool ReadArray(T* data, size_t n) {
    return this->Read(static_cast<void*>(data), sizeof(T) * n) == sizeof(T) * n;
  }
};

}  // namespace support
}  // namespace tvm

#endif  // MLC_COURSE_SHIM_TVM_SUPPORT_IO_H_
