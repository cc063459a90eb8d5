/*
 * Minimal stand-in for <tvm/support/serializer.h> (not shipped in the apache-tvm 0.27 wheel).
 * tensor.h only needs the Stream class, which io.h declares.  Written for mlc_course.
 */
#ifndef MLC_COURSE_SHIM_TVM_SUPPORT_SERIALIZER_H_
#define MLC_COURSE_SHIM_TVM_SUPPORT_SERIALIZER_H_

#include <tvm/support/io.h>

#endif  // MLC_COURSE_SHIM_TVM_SUPPORT_SERIALIZER_H_
