# Fails when an object compiled with extra instruction-set flags defines a weak or unique symbol
# (an inline function or template instance): the linker keeps one copy of such a symbol for the
# whole library, and keeping this one would put AVX2 code where baseline code is expected.
#   cmake -DNM=nm "-DOBJECTS=a.o;b.o" -P check_isa_objects.cmake
foreach(object IN LISTS OBJECTS)
  execute_process(COMMAND ${NM} --defined-only ${object} OUTPUT_VARIABLE symbols RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "nm failed on ${object}")
  endif()
  string(REGEX MATCHALL "[^\n]* [WVu] [^\n]*" weak "${symbols}")
  if(weak)
    message(FATAL_ERROR "${object} defines weak symbols (inline functions or templates shared with baseline code):\n${weak}")
  endif()
  message(STATUS "${object}: no weak symbols")
endforeach()
